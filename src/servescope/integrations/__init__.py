"""servescope under other frameworks, each an optional extra imported only on demand.

``servescope.integrations.datatrove``: an ``InferenceRunner`` for datatrove pipelines
(``pip install 'servescope[datatrove]'``) whose servers are servescope's.
"""
