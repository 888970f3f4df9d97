"""The DHT half of hivemind's quick-start, run with `import hivecli as hivemind`.

Starts a first peer, joins a second one through the address the first prints, stores a value
from one and reads it from the other, as two volunteers would on two machines. No download.

    python examples/dht_quickstart.py
"""

import hivecli as hivemind

# Create DHT: a decentralized key-value storage shared between peers
dht = hivemind.DHT(start=True)
print("To join the training, use initial_peers =", [str(addr) for addr in dht.get_visible_maddrs()])

# A second peer joins through the first one's address (on another machine: the printed address)
dht2 = hivemind.DHT(initial_peers=[str(addr) for addr in dht.get_visible_maddrs()], start=True)

expiration = hivemind.get_dht_time() + 60
assert dht.store("my_cifar_run_progress", {"step": 100, "loss": 1.83}, expiration, subkey=str(dht.peer_id))
found = dht2.get("my_cifar_run_progress", latest=True)
print("peer 2 sees:", {peer: entry.value for peer, entry in found.value.items()})

dht2.shutdown()
dht.shutdown()
