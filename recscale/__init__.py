"""The ``recscale`` command line: a thin layer over ``search``, ``trainers`` and
``analysis`` that imports heavy libraries only in the command that needs them."""
