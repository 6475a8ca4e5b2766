from ldfix.cli import run

run()
