# The echo backend behind Portcullis for tests/autobahn/run.sh (Python 2.7, autobahn 0.10.9 as
# installed by autobahntestsuite 25.10.1).
#
# Unlike `wstest -m echoserver`, it accepts permessage-deflate offers (so the 12.*/13.* cases
# negotiate compression end to end through the proxy) and fails a connection with a close
# frame instead of dropping TCP (failByDrop=False), as the suite's own fuzzing server does:
# the client then sees the server's close code (1007 for invalid UTF-8, 1002, ...) passed
# through the proxy, not the proxy's 1014 for a backend that vanished.
#
#     python echo_server.py ws://127.0.0.1:PORT
import sys

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol, listenWS
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from twisted.internet import reactor


class Echo(WebSocketServerProtocol):
    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)


def accept_deflate(offers):
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None


if __name__ == "__main__":
    factory = WebSocketServerFactory(sys.argv[1])
    factory.protocol = Echo
    factory.setProtocolOptions(failByDrop=False, perMessageCompressionAccept=accept_deflate)
    listenWS(factory)
    reactor.run()
