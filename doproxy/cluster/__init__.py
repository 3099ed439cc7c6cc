"""Cluster mode on etcd: several proxy nodes share one inventory stored in etcd, elect a leader
with an etcd lease, and the leader guards each write with a transaction on the leader key.

`doproxy.cluster.etcd` is the etcd client everything here is built on.
"""
