"""`tomtit monitor`: a read-only, live view of a running deployment.

  - state:  the fold of (topic, payload, now) messages into a `FleetState` (no I/O, no clock);
  - rows:   what each member's row says, as strings ("—" for what the publisher did not say);
  - view:   the rich dashboard (rich is imported there only: the `monitor` extra);
  - plain:  greppable lines for logs, pipes and scripts;
  - runner: the loop that feeds messages from a transport to the state and ticks a renderer.
"""
