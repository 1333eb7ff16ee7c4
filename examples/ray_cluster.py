"""Boxes spread over the nodes of a Ray cluster, used from Ray tasks (docs/scale-out.md).

python examples/ray_cluster.py

With RAY_ADDRESS set it joins that cluster (its nodes must advertise `boxlite_slots`, e.g.
`ray start --resources='{"boxlite_slots": 4}'`); without, it starts a two-node cluster on this
machine for the demonstration and ends it afterwards.
"""

import os
import shutil
import tempfile
from typing import Any

import ray

import boxlite
from boxlite.ray import SyncRayBox, SyncRayBoxlite

# A local OCI image layout, so the example runs offline (`make image` builds it); with a
# registry at hand, use image="alpine:latest" instead and drop allow_host_paths below.
IMAGE = os.path.abspath(os.environ.get("BOXLITE_EXAMPLE_IMAGE", "build/images/busybox"))


@ray.remote(num_cpus=0)
def count_words(box: SyncRayBox, text: str) -> str:
    """Runs in any Ray worker: the handle reaches the box on whichever node it lives."""
    box.write_file("/tmp/input.txt", text)
    result = box.exec("wc", ["-w", "/tmp/input.txt"]).wait()
    return result.stdout.split()[0]


def main() -> None:
    cluster: Any = None  # a local cluster this script starts (ray.cluster_utils is untyped)
    if not os.environ.get("RAY_ADDRESS"):
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(2):
            cluster.add_node(num_cpus=1, resources={"boxlite_slots": 1})
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
    else:
        ray.init()
    homes = tempfile.mkdtemp(prefix="boxlite-ray-example-")
    try:
        # The node homes live under `homes` on each node; `allow_host_paths` lets boxes name
        # the image layout by its path (it must exist on every node).
        with SyncRayBoxlite(home_base=homes, allow_host_paths=True) as runtime:
            options = boxlite.BoxOptions(rootfs_path=IMAGE, memory_mib=256)
            boxes = [runtime.create(options) for _ in range(2)]
            print(f"boxes on {len({box.node_id for box in boxes})} different nodes")
            texts = ["one two three", "four five six seven"]
            counts = ray.get([count_words.remote(box, text) for box, text in zip(boxes, texts, strict=True)])
            print("words counted in boxes:", ", ".join(counts))
            for capacity in runtime.nodes():
                print(f"node {capacity.node_id[:8]}: {capacity.boxes} of {capacity.slots} slots used")
        # Leaving the `with` stopped the boxes and the node runtimes this script started.
        print("closed")
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(homes, ignore_errors=True)


if __name__ == "__main__":
    main()
