"""The science core: pure functions over numpy arrays (and torch/cellpose where needed).

Nothing here imports FastAPI, Celery, SQLAlchemy or anything else from ``app``: the core can be
used from a notebook, a worker or the command line alike. Modules that need torch or cellpose
import them at module level, so importing ``app.science`` itself stays light: import the module
you need (``from app.science import metrics``).
"""
