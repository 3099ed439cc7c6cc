"""The pure core: no asyncio, no sockets, no clock reads. Time comes in as an argument."""
