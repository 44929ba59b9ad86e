from .cli import main

raise SystemExit(main(prog="python -m async_embed_sync"))
