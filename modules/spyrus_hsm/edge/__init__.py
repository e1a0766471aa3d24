"""IoT Edge runtime glue: the module client, twin configuration, reported state, direct methods.

- `environment`: is this an IoT Edge module, and how does it reach edgeHub (detection only);
- `twin`: desired properties -> validated configuration (pure functions);
- `reported`: the reported-properties document (pure functions);
- `agent`: the SDK module client's lifecycle (and SAS re-mint), driving the parts below;
- `sdkcalls`: the agent's SDK calls, bounded and their errors translated;
- `desired`: desired properties and the config file -> the live configuration, one path;
- `document`: the reported document the agent keeps (HSM state, inventory, last error);
- `methods`: the direct methods;
- `hooks`: what these share (the hooks into the module); an exception is told in one line by
  `errors.one_line`.
"""
