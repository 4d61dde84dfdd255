"""localnet across hosts, through NATS (``pip install 'localnet[nats]'``).

A peer given a NATS setting (``Peer(nats="nats://user:pass@server:4222")``
or ``LOCALNET_NATS``; see :mod:`localnet.nats._config`) announces itself to
the peers of the other hosts on the same server or cluster and namespace,
lists theirs in ``localnet.peers()`` as ``name@host``, calls them and
answers their calls (:mod:`localnet.nats._link`), and sends its events to
their subscribers, acknowledged and in order (:mod:`localnet.nats._events`).
Peers of one host still talk through the registry and Unix sockets, as
without it.  The peer knows all this as one of its transports
(:class:`~localnet.nats._transport.NatsTransport`, beside the one-host
:class:`~localnet._local.LocalTransport`; see :mod:`localnet._transports`).
Payloads beyond the server's ``max_payload`` go in parts
(:mod:`localnet.nats._parts`).
"""
