# The Riak Python client (HTTP transport) against a dynakv node; see riak-python-client-check.sh.
import collections, collections.abc
for name in [n for n in dir(collections.abc) if not n.startswith("_")]:
    setattr(collections, name, getattr(collections.abc, name))
_nt = collections.namedtuple
def _namedtuple(*a, **k):
    k.pop("verbose", None)
    return _nt(*a, **k)
collections.namedtuple = _namedtuple
import sys, riak
# Usage: riak_python_client_check.py [http|pbc] PORT [PORT...]  (one node per port)
args = sys.argv[1:]
protocol = args.pop(0) if args and args[0] in ('http', 'pbc') else 'http'
ports = [int(p) for p in args] or [8098]
port_field = 'http_port' if protocol == 'http' else 'pb_port'
c = riak.RiakClient(protocol=protocol,
                    nodes=[{'host': '127.0.0.1', port_field: p} for p in ports])
print("protocol", protocol, "nodes", ports)
assert c.ping(), "ping"
print("ping ok")
name = 'pyclient-' + protocol
b = c.bucket(name)
o = b.new('k1', data={'a': 1})
o.store()
print("stored", o.key, o.vclock is not None)
f = b.get('k1')
assert f.exists and f.data == {'a': 1}, f.data
print("fetched", f.data)
# siblings
b.set_property('allow_mult', True)
o1 = b.get('sib'); o1.data = 'x'; o1.content_type = 'text/plain'; o1.store()
o2 = b.new('sib', data='y', content_type='text/plain'); o2.store()
s = b.get('sib')
assert sorted(x.data for x in s.siblings) == ['x', 'y'], [x.data for x in s.siblings]
print("siblings", sorted(x.data for x in s.siblings))
# resolve
s.siblings = [s.siblings[0]]
s.data = 'merged'
s.store()
r = b.get('sib')
assert r.data == 'merged' and len(r.siblings) == 1, (r.data, len(r.siblings))
print("resolved", r.data)
# metadata
m = b.new('meta', data='v', content_type='text/plain'); m.usermeta = {'color': 'blue'}; m.store()
assert b.get('meta').usermeta == {'color': 'blue'}, b.get('meta').usermeta
print("usermeta", b.get('meta').usermeta)
# server-made key
n = b.new(None, data='auto', content_type='text/plain'); n.store()
assert n.key and b.get(n.key).data == 'auto'
print("new key", n.key)
# delete
b.get('k1').delete()
assert not b.get('k1').exists
print("deleted")
keys = sorted(b.get_keys())
assert 'meta' in keys and 'sib' in keys and 'k1' not in keys, keys
print("keys", keys)
assert name in [x.name for x in c.get_buckets()]
print("buckets ok")
assert b.get_property('n_val') == 3
print("props ok")
# bucket types: `pytype` was created (n_val 2, allow_mult false) and activated by the
# shell script; a bucket of it is not the default type's bucket of the same name
t = c.bucket_type('pytype')
tprops = t.get_properties()
assert tprops['n_val'] == 2 and tprops['allow_mult'] is False, tprops
tb = t.bucket(name)
o = tb.new('typed', data='in a type', content_type='text/plain'); o.store()
assert tb.get('typed').data == 'in a type'
assert not b.get('typed').exists
assert name in [x.name for x in t.get_buckets()]
assert sorted(tb.get_keys()) == ['typed'], tb.get_keys()
assert tb.get_property('n_val') == 2
t.set_property('r', 1)
assert t.get_property('r') == 1, t.get_property('r')
print("bucket types ok")
print("preflist", b.get_preflist('meta') if hasattr(b, 'get_preflist') else 'n/a')
print("OK: every step passed")
