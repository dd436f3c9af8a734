from mnistops.cli import app

app(prog_name="mnistops")
