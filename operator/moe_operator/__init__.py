"""moe_operator: the kopf operator that serves MoEDeployment resources with moe-runtime groups.

Owns the typed spec (spec.py), pure rendering of Kubernetes objects (render.py), the reconcile loop and
its handlers. It never imports torch: from the runtime it uses only `moe_runtime.placement` and
`moe_runtime.api`, both torch-free.
"""
