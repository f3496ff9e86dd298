"""Fleet fine-tuning on Flower: many devices fine-tune one model together with MobileTL and send
back only what they train (``edgetl fleet``; needs the ``edgetl[fleet]`` extra).

One concept per module: :mod:`~edgetl.fleet.config` (the settings), :mod:`~edgetl.fleet.payload`
(which tensors travel, as numpy arrays keyed by state-dict name), :mod:`~edgetl.fleet.validate`
(rejecting a bad reply), :mod:`~edgetl.fleet.aggregate` (FedAvg per key), :mod:`~edgetl.fleet.partition`
(splitting one dataset over simulated clients), :mod:`~edgetl.fleet.checkpoint` (the server's
per-round global model), :mod:`~edgetl.fleet.sizing` (a client's K from its device profile),
:mod:`~edgetl.fleet.local` (one client's local fine-tuning), :mod:`~edgetl.fleet.client` and
:mod:`~edgetl.fleet.server` (Flower's ClientApp and ServerApp), :mod:`~edgetl.fleet.simulation`
and :mod:`~edgetl.fleet.deployment` (the two ways to run them). Only the client, the server and
the simulation import ``flwr``; the deployment runs Flower's executables.
"""
