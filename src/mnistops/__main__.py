from mnistops.cli import entry

entry()
