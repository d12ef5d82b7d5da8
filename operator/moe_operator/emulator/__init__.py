"""An in-repo Kubernetes API server for the operator's tests and `make demo`, built on kmock.

`running_cluster()` serves one on 127.0.0.1 in a background thread and writes a kubeconfig for it;
`python -m moe_operator.emulator` serves one in the foreground. Test and demo code only: the operator
itself never imports this package.
"""

from moe_operator.emulator.cluster import Cluster
from moe_operator.emulator.crd import CustomResource, custom_resources
from moe_operator.emulator.runner import RunningCluster, running_cluster, serve, write_kubeconfig

__all__ = ['Cluster', 'CustomResource', 'RunningCluster', 'custom_resources', 'running_cluster', 'serve',
           'write_kubeconfig']
