"""L4, everything that talks to the Hub (huggingface_hub is imported only here and in
:mod:`rvhub.card`): :mod:`.resolve` turns ids into local folders, :mod:`.download` fetches
them, :mod:`.push` publishes an artifact and its card (built by :mod:`rvhub.card.build`) in one
commit; :mod:`.errors` turns each Hub or network failure into one line."""
