"""Module-level Flower apps for the deployment engine (`flwr run` loads `veil.fl.app:server_app`).

Configuration comes from the run config (`FLConfig` keys with dashes) and each SuperNode's node
config (`partition-id`)."""

from veil.fl.clientapp import make_client_app
from veil.fl.serverapp import make_server_app

server_app = make_server_app()
client_app = make_client_app()
