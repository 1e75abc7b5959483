"""The private internals of other libraries that mmlit reads or sets, one module per library, where no public API
does the job. Each helper names the version it was checked against, and ``tests/test_compat.py`` fails when an
attribute it relies on moves: a library upgrade breaks a test here, not a training run."""
