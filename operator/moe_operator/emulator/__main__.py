"""`python -m moe_operator.emulator --port P --kubeconfig FILE`: serve a cluster until SIGINT or SIGTERM.

For `make demo`: writes the kubeconfig once listening, prints one line saying where, and keeps bounded
logs (object history, requests) so that a long demo does not grow without limit.
"""

import argparse
import asyncio
import signal

from moe_operator.emulator.cluster import Cluster
from moe_operator.emulator.runner import serve, write_kubeconfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m moe_operator.emulator', description=__doc__)
    parser.add_argument('--port', type=int, default=0, help='TCP port on 127.0.0.1 (0: any free port)')
    parser.add_argument('--kubeconfig', required=True, help='where to write the kubeconfig for this cluster')
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.port, args.kubeconfig))


async def _serve(port: int, kubeconfig: str) -> None:
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stopping.set)

    def started(cluster: Cluster, actual_port: int) -> None:
        url = f'http://127.0.0.1:{actual_port}'
        write_kubeconfig(kubeconfig, url)
        print(f'kubernetes emulator serving {url}; kubeconfig {kubeconfig}', flush=True)
    await serve(port, stopping, started, history_limit=5, request_limit=2000, event_limit=5000)


if __name__ == '__main__':
    main()
