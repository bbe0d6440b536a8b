"""The workbench: ``mechscope serve`` starts a local web app for looking inside a model from a
browser, with experiments saved in SQLite so they survive a restart."""

from mechscope.app.server import create_app, serve
from mechscope.app.store import ExperimentStore

__all__ = ["ExperimentStore", "create_app", "serve"]
