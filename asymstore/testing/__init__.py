"""Test support that ships with asymstore: the backend conformance kit and process probes.

:mod:`asymstore.testing.conformance` is the suite every :class:`~asymstore.interfaces.ObjectStore` backend
runs (third-party ones too); :mod:`asymstore.testing.statemachine` drives a ``Store`` against a model;
:mod:`asymstore.testing.process` reads this process's memory use.
"""
