"""Stage: serving -- settings and the HTTP protocol (``protocol``), request policy without Ray (``policy``), the
FastAPI routes (``routes``), the Ray Serve deployments (``deployments``), metrics (``metrics``), the local
runner (``runner``), and offline batch inference with Ray Data (``batch``). Imports the stages below and
``api``, never ``sweep`` or ``cli``."""
