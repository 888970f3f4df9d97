"""hivemind 1.x's quick-start, run on hive: `import hivecli as hivemind` is the only change to the
training code. The command-line options stand in for the quick-start's hand edits:

    python examples/quickstart_1x.py                                   # first peer
    python examples/quickstart_1x.py --initial-peers /ip4/127.0.0.1/tcp/PORT/p2p/12D3KooW...

The second peer (the one given --initial-peers) calls `opt.load_state_from_peers()` before its
loop, as the tutorial's second peer does. CIFAR-10 is the default, as in the quick-start; where it
cannot be downloaded (or torchvision is missing) the script says so and trains on the offline
dataset `digits` (real handwritten digits that ship with scikit-learn, resized to CIFAR's
3 x 32 x 32). `--dataset digits` asks for it directly. `--max-seconds` and `--save` let scripts and
tests run it to an end; `--target-batch-size` (10000, as in the tutorial) lets them see several
epochs in a few seconds.
"""

import argparse
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import hivecli as hivemind
from hivecli.datasets import load_digits, load_torchvision_dataset

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs printed by a running peer")
parser.add_argument("--dataset", choices=["cifar10", "digits"], default="cifar10")
parser.add_argument("--max-seconds", type=float, default=None, help="stop training after this long")
parser.add_argument("--save", help="save the model's state_dict here at the end")
parser.add_argument("--target-batch-size", type=int, default=10000, help="samples the run processes per epoch")
args = parser.parse_args()

# Create dataset and model, same as in the basic tutorial
# For this basic tutorial, we download only the training set
trainset = None
if args.dataset == "cifar10":
    try:
        trainset = load_torchvision_dataset("cifar10", root="./data", train=True)
    except hivemind.ConfigError as e:
        print(f"CIFAR-10 is not available: {e}; training on 'digits' instead", file=sys.stderr)
if trainset is None:
    trainset, _ = load_digits(image_size=32, channels=3)

model = nn.Sequential(nn.Conv2d(3, 16, (5, 5)), nn.MaxPool2d(2, 2), nn.ReLU(),
                      nn.Conv2d(16, 32, (5, 5)), nn.MaxPool2d(2, 2), nn.ReLU(),
                      nn.Flatten(), nn.Linear(32 * 5 * 5, 10))  # fmt: skip
opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)

# Create DHT: a decentralized key-value storage shared between peers
dht = hivemind.DHT(initial_peers=args.initial_peers, start=True)
print("To join the training, use initial_peers =", [str(addr) for addr in dht.get_visible_maddrs()], flush=True)

# Set up a decentralized optimizer that will average with peers in background
opt = hivemind.Optimizer(
    dht=dht,                  # use a DHT that is connected with other peers
    run_id='my_cifar_run',    # unique identifier of this collaborative run
    batch_size_per_step=32,   # each call to opt.step adds this many samples towards the next epoch
    target_batch_size=args.target_batch_size,  # after peers collectively process this many samples,
                                               # average weights and begin the next epoch
    optimizer=opt,            # wrap the SGD optimizer defined above
    use_local_updates=True,   # perform optimizer steps with local gradients, average parameters in background
    matchmaking_time=3.0,     # when averaging parameters, gather peers in background for up to this many seconds
    averaging_timeout=10.0,   # give up on averaging if not successful in this many seconds
    verbose=True              # print logs incessently
)  # fmt: skip

if args.initial_peers:
    opt.load_state_from_peers()

# Note: if you intend to use GPU, switch to it only after the decentralized optimizer is created
deadline = time.monotonic() + args.max_seconds if args.max_seconds else float("inf")
with tqdm() as progressbar:
    while time.monotonic() < deadline:
        for x_batch, y_batch in torch.utils.data.DataLoader(trainset, shuffle=True, batch_size=32):
            opt.zero_grad()
            loss = F.cross_entropy(model(x_batch), y_batch)
            loss.backward()
            opt.step()

            progressbar.desc = f"loss = {loss.item():.3f}"
            progressbar.update()
            if time.monotonic() >= deadline:
                break

if args.save:
    torch.save(model.state_dict(), args.save)
print(f"Done: epoch {opt.local_epoch}, {opt.rounds_finished} averaging rounds", flush=True)
opt.shutdown()
dht.shutdown()
