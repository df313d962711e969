"""`sftlab ui`: a local web app to prepare, launch, watch, compare and chat with runs.

Layout: `workspace` (files only inside the workspace), `runs` (what a run directory says about itself: state,
curves, metrics, predictions), `launch` (a run is a separate, detached `python -m sftlab train` process), `form`
(the new-run form from the config dataclasses, validated and previewed by the same functions as the command line),
`chat` (streaming chat through `sftlab.chat`), `app` (the Starlette routes, the access token, server-sent events).
"""
