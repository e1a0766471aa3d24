"""IoT Edge runtime glue: the module client, twin configuration, reported state, direct methods.

- `environment`: is this an IoT Edge module, and how does it reach edgeHub (detection only);
- `twin`: desired properties -> validated configuration (pure functions);
- `reported`: the reported-properties document (pure functions);
- `agent`: the SDK module client, its handlers and the direct methods.
"""
