"""The Kademlia DHT: peers find each other and share small records with expiration times."""

from hivecli.dht.dht import DHT
from hivecli.dht.node import DHTNode
from hivecli.dht.routing import DHTID, RoutingTable
from hivecli.dht.settings import DHTSettings
from hivecli.dht.storage import ValueWithExpiration

__all__ = [
    "DHT",
    "DHTID",
    "DHTNode",
    "DHTSettings",
    "RoutingTable",
    "ValueWithExpiration",
]
