"""App-only helpers (never imported by the engine): session state, cached engine calls, error
messages fit for a browser, uploads, and the widgets several views share. Views import from here
and from the engine; nothing here imports a view.
"""
