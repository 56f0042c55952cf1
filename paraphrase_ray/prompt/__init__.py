"""Stage: the soft prompt itself -- the learned vectors (``soft_prompt``), the PEFT-compatible directory that
every stage exchanges (``directory``: file names, ``PromptMeta``, readers/writers), a directory loaded with its
base model (``bundle``: ``PromptBundle``, ``load_prompt``, ``System``), its model card (``card``), the Hub
(``hub``), and what each vector sits nearest to (``explain``). Imports only the flat core."""
