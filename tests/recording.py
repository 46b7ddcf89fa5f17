"""A transport wrapper for tests that look at what the server receives."""


class RecordingTransport:
    """A transport that keeps every (task, request config, reply) the server receives."""

    def __init__(self, transport, log):
        self.transport, self.log = transport, log

    def node_ids(self):
        return self.transport.node_ids()

    def request_bytes(self, request):
        return self.transport.request_bytes(request)

    def exchange(self, task, requests, timeout):
        responses = self.transport.exchange(task, requests, timeout)
        for r in responses:
            if r.reply is not None:
                self.log.append((task, requests[r.node].config if r.node in requests else {}, r.reply))
        return responses
