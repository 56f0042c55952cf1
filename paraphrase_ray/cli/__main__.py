"""``python -m paraphrase_ray.cli``: the ``paraphrase-ray`` command line."""

import sys

from paraphrase_ray.cli.main import main

sys.exit(main())
