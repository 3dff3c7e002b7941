"""Who hands a message to ``VirtualHost.publish``: a client (counted in the
statistics), dead-lettering, or a delayed exchange whose message fell due
(its exchange's deduplication saw it when it was first published)."""

CLIENT = 0
DEAD_LETTER = 1
DELAYED = 2
