"""The Node-RED baseline: the flow a Node-RED user would build for the same bridging."""
