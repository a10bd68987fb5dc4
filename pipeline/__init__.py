"""Entry points (prepare, train, evaluate, run) and the code they share; importing it registers the config
resolvers of `pipeline.resolvers`."""

from pipeline.resolvers import register as _register_resolvers

_register_resolvers()
