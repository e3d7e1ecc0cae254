"""`python -m ottimo.cli`: the same app as the `ottimo` command."""

from ottimo.cli.main import app

app()
