"""Training on a Ray cluster: a run submitted as a Ray job that comes back as any other run (docs/cluster.md).

    protocol  the lines the job prints and the app reads back (events, files in checksummed chunks)
    stage     what travels with the job: the engine package, the run's settings, small data, a resume point
    client    the cluster's address, reached and checked before anything is written; submit, stop, logs
    job       the job's entrypoint on the cluster (the driver): N Ray Train workers, the mailbox, the log
    worker    one Ray Train worker: the engine's ``fit`` on the process group Ray Train made
    follow    the app's side: the job's log written into the local run folder, live; cancel; re-attach
    submit    ``python -m engine train --cluster URL``: all of the above in order

Ray is imported only here, and only when a cluster is named: the app's requirements stay light.
"""
