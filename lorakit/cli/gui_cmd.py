"""`lorakit gui`: the web GUI (Gradio) on http://127.0.0.1:7860 by default.

    lorakit gui                                   # this folder is the only one the GUI may use
    lorakit gui --root /data/datasets --root /data/models --jobs_dir /data/jobs
    lorakit gui --listen --auth me:secret         # reachable from other machines (0.0.0.0), with a login
"""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("gui", help="start the web GUI (train, watch, compare and manage LoRAs in a browser)",
                              description="Start the lorakit web GUI. It binds 127.0.0.1 unless --listen, reads and "
                                          "writes only under the --root folders, and runs training jobs one at a "
                                          "time in worker processes whose state lives in --jobs_dir.")
    p.add_argument("--listen", nargs="?", const="0.0.0.0", default=None, metavar="ADDR",
                   help="bind this address instead of 127.0.0.1 (no ADDR: 0.0.0.0, every interface)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    p.add_argument("--root", action="append", default=None, metavar="DIR",
                   help="a folder the GUI may browse, read and write (repeatable; default: the current folder)")
    p.add_argument("--jobs_dir", default=None, help="folder of the training jobs (default ~/.lorakit/jobs)")
    p.add_argument("--outputs", default=None, help="folder for generated images (default <first root>/outputs)")
    p.set_defaults(func=run)


def parse_auth(text: str | None) -> tuple[str, str] | None:
    from lorakit.errors import UserError

    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UserError(f"--auth {text!r}: give USER:PASSWORD (both non-empty).")
    return user, password


def run(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        from lorakit.errors import UserError

        raise UserError("The GUI needs gradio: pip install gradio (or pip install lorakit, which includes it).") \
            from None
    from lorakit.gui.app import launch

    auth = parse_auth(args.auth)
    if args.listen and not auth:
        print("lorakit gui: note: listening on " + args.listen + " without --auth; anyone who can reach this port "
              "can train and read files under the roots.")
    # Gradio's own start-up lines end with a hint to make a public share link, which lorakit never does (the GUI
    # reads and writes local files): start it quietly and say where it runs instead
    demo, ctx, url = launch(roots=args.root, jobs_dir=args.jobs_dir, listen=args.listen, port=args.port, auth=auth,
                            outputs=args.outputs, block=False, quiet=True)
    import signal
    import time

    # Ctrl-C stops the server even when this process was started with SIGINT ignored (a background job of a script
    # passes it on that way, and Python then installs no handler of its own)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:  # the announcement is inside: a Ctrl-C right after it must still stop the server threads, not hang the exit
        print(f"lorakit gui: open {url} in a browser (Ctrl-C to stop; running training jobs keep going and are shown "
              "again by the next `lorakit gui`).", flush=True)
        while getattr(demo, "is_running", True):
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("lorakit gui: stopped.", flush=True)
    finally:
        ctx.store.shutdown()
        demo.close()
    return 0
