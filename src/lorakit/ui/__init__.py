"""`lorakit ui`: a local web dashboard over runs, data, a playground and exports (FastAPI + static files).

Training and exports run as separate processes (`python -m lorakit ...`), never inside the web server, so closing
the page or restarting the dashboard loses nothing; a run's state is read from its own files and lock.
"""
