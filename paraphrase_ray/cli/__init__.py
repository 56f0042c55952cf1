"""The ``paraphrase-ray`` command line and ``make demo``: argument parsing and the commands, which call library
functions of the stages. Nothing in the package imports this folder."""
