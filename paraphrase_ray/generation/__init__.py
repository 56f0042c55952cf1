"""Stage: paraphrases from a frozen model and (per row) a soft prompt -- rows and routing (``generate``), our
decode loop (``decode``), the rules every step applies (``rules``: ``DecodeRules``, n-gram bans, penalties,
stops), the fact guard (``fact_guard``), prompt-lookup drafting (``lookup``), the shared-prefix KV cache
(``prefix_cache``), and the engines a step can run on (``backends``). Imports the flat core and ``prompt``."""
