"""A projection module that fails to import, for the tests of REHYDRATE_PROJECTIONS pointing at broken code."""

raise RuntimeError("the projection module is broken on purpose")
