"""kmock's KubernetesEmulator made into an API server that kopf, kubectl and the kubernetes client accept.

Owns the store's semantics: metadata (uid, resourceVersion, generation), create/get/list/watch/patch/
replace/delete with finalizers, the patch types, watch resumption, discovery, errors as Status objects.
Each fix of a kmock 0.8 defect (shared/reference/tooling.md, section 2) is marked `defect N`; schemas,
subresources, Tables and selectors are crd.py's. No controllers, no garbage collector, no kubernetes client.
"""

import asyncio
import copy
import random
import re
import traceback
import uuid
import warnings
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import yaml
from kmock._internal import apps, parsing, rendering

from moe_operator.emulator import crd
from moe_operator.emulator.crd import api_error
from moe_operator.emulator.patching import merge_patch, strategic_merge_patch

CRDS = kmock.resource('apiextensions.k8s.io', 'v1', 'customresourcedefinitions')
NAMESPACES = kmock.resource('', 'v1', 'namespaces')
CR_VERBS = ('create', 'delete', 'deletecollection', 'get', 'list', 'patch', 'update', 'watch')
SMP, APPLY = 'application/strategic-merge-patch+json', 'application/apply-patch+yaml'
Key = tuple[kmock.resource, str | None, str]  # (resource, namespace, name), as kmock's `objects` keys
_SERVER_OWNED = ('uid', 'creationTimestamp', 'name', 'namespace', 'generation', 'deletionTimestamp',
                 'resourceVersion')
_NAME = re.compile(r'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')
_BAD_NAME = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
             'and must start and end with an alphanumeric character')
_NO_PROTOBUF = 'the emulator reads JSON and YAML only, not protobuf (for kubectl create, use kubectl apply)'
_MODIFIED = 'the object has been modified; please apply your changes to the latest version and try again'



# defect 1: kmock's parser raises on /api/v1/namespaces (kopf -n NS then retries forever) and reads
# /api/v1/namespaces/NAME as a namespace without a resource. Namespaces' own paths are parsed here.
def _parse_path(path: str) -> parsing.ParsedPath:
    parts = path.strip('/').split('/')
    head = {'api': 2, 'apis': 3}.get(parts[0], 0)
    rest = parts[head:] if head and len(parts) > head else []
    own = len(rest) <= 2 or (len(rest) == 3 and rest[2] in ('status', 'finalize'))
    if rest[:1] == ['namespaces'] and own:
        return parsing.ParsedPath('' if head == 2 else parts[1], parts[head - 1], 'namespaces', None,
                                  rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None)
    return _parse_path.original(path)


_parse_path.original = getattr(parsing.parse_path, 'original', parsing.parse_path)
parsing.parse_path = _parse_path


@attrs.define(kw_only=True)
class Cluster(kmock.KubernetesEmulator):
    """An in-memory Kubernetes API server; serve it with `runner.running_cluster()`.

    Writes happen in kmock's fallback reactions, so a reaction a test adds (say, an injected 500) takes
    precedence and the write does not happen. kmock's `objects[...]` and request assertions work as before.
    """

    history_limit: int | None = None  # versions kept per object in `objects` (None: all, for assertions)
    event_limit: int = 10_000  # watch events kept; a watch from an older resourceVersion gets 410 Expired
    request_limit: int | None = None  # kmock's request log length (None: unbounded; set for long demos)
    _crs: dict[kmock.resource, crd.CustomResource] = attrs.field(factory=dict, init=False)
    _log: list[tuple[Any, ...]] = attrs.field(factory=list, init=False)  # (key, type, object, old object)
    _log_base: int = attrs.field(default=0, init=False)  # the resourceVersion just before _log[0]
    _rv: int = attrs.field(default=0, init=False)
    _changed: asyncio.Condition = attrs.field(init=False)  # on the store's lock; notified on every write
    _closing: bool = attrs.field(default=False, init=False)
    _own_payloads: int = attrs.field(default=0, init=False)  # kmock's and this class's fallback reactions

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._changed = asyncio.Condition(self._lock)
        with warnings.catch_warnings():  # kmock 0.8 reads its bundle with a deprecated importlib call
            warnings.simplefilter('ignore', DeprecationWarning)
            self.resources.load_bundled()
        for method in (kmock.method.PUT, kmock.method.POST, kmock.method.DELETE):
            self.fallback[method] << self._dispatch  # replace, deletecollection: kmock answers 404
        self._own_payloads = len(self._payloads)

    # kmock registered these as its fallbacks; every resource request is served by _dispatch instead.
    async def _serve_list(self, request: rendering.Request) -> rendering.Response:
        return await self._dispatch(request)

    _serve_watch = _serve_fetch = _serve_create = _serve_update = _serve_delete = _serve_list

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if self.request_limit and len(self._requests) > self.request_limit:
            del self._requests[: len(self._requests) // 2]
            for errors in self._errors:
                del errors[: len(errors) // 2]
        if len(self._payloads) > self._own_payloads:  # a test added reactions: kmock matches them
            # Not KubernetesEmulator._handle: that one writes the store before the reactions run.
            return await apps.RawHandler._handle(self, request)
        # kmock's matching runs every past request through each reaction's filters: O(requests so far)
        # per request, 0.1 s after a few thousand. Without a test's own reactions, route directly.
        response = await self._route(request)
        return await response(request)

    async def _route(self, request: rendering.Request) -> rendering.Response:
        given, path = request.resource, request.url.path.rstrip('/') or '/'
        if given is not None and given.plural is not None:
            return await self._dispatch(request)
        serve = {'/': self._serve_root, '/version': self._serve_server_version, '/api': self._serve_api,
                 '/apis': self._serve_apis}.get(path)
        if serve is None and given is not None:
            serve = self._serve_version if given.version else self._serve_group
        if serve is None or request.method != kmock.method.GET:
            raise kmock.KubernetesEndpointNotFoundError()
        return _reply(await serve(request))

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        status, reason, message, details = 500, 'InternalError', repr(exc), {'trace': traceback.format_exc()}
        if isinstance(exc, UnicodeDecodeError):  # kmock decodes every body as text
            status, reason, message, details = 415, 'UnsupportedMediaType', _NO_PROTOBUF, {}
        elif isinstance(exc, kmock.KubernetesNotFoundError):  # kmock's own 404s carry odd reasons
            status, reason, details = 404, 'NotFound', {}
            message = 'the server could not find the requested resource'
        elif isinstance(exc, kmock.KubernetesError):
            status, reason, message, details = exc.status, exc.reason, exc.message, exc.details or {}
        return aiohttp.web.json_response({
            'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure', 'message': message,
            'reason': reason, 'details': details, 'code': status}, status=status)

    async def _serve_version(self, request: rendering.Request) -> dict[str, Any]:
        doc = await super()._serve_version(request)
        doc['groupVersion'] = doc['groupVersion'].lstrip('/')  # defect 9: "/v1" for the core group
        for entry in doc['resources']:
            if '/' in entry['name']:  # defect 9: subresources copied the parent's shortNames and verbs
                entry.update(shortNames=[], categories=[], verbs=['get', 'patch', 'update'])
                if entry['name'].endswith('/scale'):  # kubectl scale reads the Scale's group from here
                    entry.update(group='autoscaling', version='v1', kind='Scale')
        doc['resources'].sort(key=lambda entry: entry['name'])
        return doc

    def _get_resources(self) -> list[kmock.resource]:
        # kmock adds the resources of stored objects: a deleted CRD's would stay discoverable.
        return [res for res in super()._get_resources() if res in self.resources]

    async def create_object(self, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create an object as a POST would, from within the server's loop (seeding, in-loop tests)."""
        res = kmock.resource(resource)
        namespace = body.get('metadata', {}).get('namespace')
        response = await self._create(res, self.resources[res], copy.deepcopy(body), namespace, {})
        return response.payload

    async def close_streams(self) -> None:
        """End every open watch stream: the HTTP server's shutdown waits for them."""
        async with self._changed:
            self._closing = True
            self._changed.notify_all()

    async def _dispatch(self, request: rendering.Request) -> rendering.Response:
        given, method, sub = request.resource, request.method, request.subresource
        if given is None or given.plural is None:
            raise kmock.KubernetesEndpointNotFoundError()
        res = kmock.resource(given.group, given.version, given.plural)
        served = self.resources[res].subresources & {'status', 'scale'} if res in self.resources else None
        if served is None or sub not in {None, *served}:
            raise kmock.KubernetesNotFoundError()
        if 'protobuf' in _content_type(request):
            raise api_error(415, 'UnsupportedMediaType', _NO_PROTOBUF)
        info, named = self.resources[res], request.name is not None
        key = (res, request.namespace if info.namespaced else None, request.name)
        if method == kmock.method.GET and request.params.get('watch') in ('true', '1'):
            return await self._watch(request, key)
        if method == kmock.method.GET:
            return await (self._get(request, key) if named else self._list(request, key))
        if method == kmock.method.POST and not named and sub is None:
            return await self._create(res, info, _body(request), request.namespace, request.params)
        if method in (kmock.method.PATCH, kmock.method.PUT) and named:
            return await self._update(request, key)
        if method == kmock.method.DELETE and sub is None:
            return await (self._delete(request, key) if named else self._delete_all(request, key))
        raise api_error(405, 'MethodNotAllowed', 'the server does not allow this method on the resource')

    async def _get(self, request: rendering.Request, key: Key) -> rendering.Response:
        async with self._lock:
            obj = self._current(key)
        if request.subresource == 'scale':
            return _reply(crd.scale_of(obj, self._scale_paths(key[0])))
        table = crd.table_args(_header(request, 'Accept'), request.params, self._crs.get(key[0]))
        return _reply(crd.table([obj], *table, obj['metadata']['resourceVersion']) if table else obj)

    async def _list(self, request: rendering.Request, key: Key) -> rendering.Response:
        match = crd.selector(request.params)
        table = crd.table_args(_header(request, 'Accept'), request.params, self._crs.get(key[0]))
        async with self._lock:
            objs, rv = [obj for _, obj in self._stored(key[0], key[1]) if match(obj)], str(self._rv)
        if table:
            return _reply(crd.table(objs, *table, rv))
        kind = self.resources[key[0]].kind  # defect 8: kmock's lists had no kind and apiVersion
        return _reply({'apiVersion': _api_version(key[0]), 'kind': f'{kind}List',
                       'metadata': {'resourceVersion': rv}, 'items': objs})

    async def _create(self, res: kmock.resource, info: kmock.ResourceInfo, body: Any, namespace: str | None,
                      params: dict[str, str]) -> rendering.Response:
        if not isinstance(body, dict):
            raise api_error(400, 'BadRequest', 'the body of the request is not a JSON object')
        meta, cr = body.setdefault('metadata', {}), self._crs.get(res)
        ns = _create_namespace(info, namespace, meta)
        if not meta.get('name') and meta.get('generateName'):  # defect 11: generateName gave a 500
            meta['name'] = meta['generateName'] + ''.join(random.choices('bcdfghjklmnpqrstvwxz2456789', k=5))
        _check_name(info.kind, res, meta.get('name'))
        body['apiVersion'], body['kind'] = _api_version(res), info.kind
        if 'status' in info.subresources:  # the status subresource owns status: ignored on create
            body.pop('status', None)
        body = cr.admit(body, None, params.get('fieldValidation') == 'Strict') if cr else body
        crs = crd.custom_resources(body) if res == CRDS else None
        if crs or res == NAMESPACES:  # what the API server's own controllers would write
            body['status'] = crd.crd_status(body) if crs else {'phase': 'Active'}
        async with self._changed:
            key = (res, ns, body['metadata']['name'])
            if self._exists(key):
                raise api_error(409, 'AlreadyExists', f'{_qualified(res)} "{key[2]}" already exists',
                                name=key[2], group=res.group, kind=res.plural)
            # defect 3: kmock set no uid, resourceVersion (see _commit), creationTimestamp or generation
            body['metadata'].update(uid=str(uuid.uuid4()), creationTimestamp=crd.now(), generation=1)
            if params.get('dryRun'):
                return _reply(body, 201)
            obj = self._commit(key, 'ADDED', body, None)
            self._register(crs or [])
        return _reply(obj, 201)  # defect 5: kmock answered 200, so the client returned None

    async def _update(self, request: rendering.Request, key: Key) -> rendering.Response:
        res, sub, body, cr = key[0], request.subresource, _body(request), self._crs.get(key[0])
        if _content_type(request) == APPLY and sub is None and not self._exists(key):  # server-side apply
            return await self._create(res, self.resources[res], body, key[1], request.params)
        async with self._changed:
            old = self._current(key)
            wanted = (body.get('metadata') or {}).get('resourceVersion') if isinstance(body, dict) else None
            if wanted and wanted != old['metadata']['resourceVersion']:
                raise api_error(409, 'Conflict', f'Operation cannot be fulfilled on {_qualified(res)} '
                                f'"{key[2]}": {_MODIFIED}', name=key[2], group=res.group, kind=res.plural)
            if sub == 'scale':
                paths = self._scale_paths(res)
                put = request.method == kmock.method.PUT
                scale = body if put else _patched(crd.scale_of(old, paths), request, body, custom=False)
                new = crd.rescale(old, scale, paths)
            else:
                new = body if request.method == kmock.method.PUT else _patched(old, request, body, bool(cr))
                if 'status' in self.resources[res].subresources:
                    new = crd.isolate_status(old, new, sub)
            new = _admitted(old, new, request, res, cr)
            if request.params.get('dryRun') or new == old:  # a no-op write changes no resourceVersion
                return _reply(crd.scale_of(new, self._scale_paths(res)) if sub == 'scale' else new)
            obj = self._commit(key, 'MODIFIED', new, old)
            self._register(crd.custom_resources(obj) if res == CRDS else [])
            if obj['metadata'].get('deletionTimestamp') and not obj['metadata'].get('finalizers'):
                self._drop(key, obj)  # the last finalizer is gone: so is the object
        return _reply(crd.scale_of(obj, self._scale_paths(res)) if sub == 'scale' else obj)

    async def _delete(self, request: rendering.Request, key: Key) -> rendering.Response:
        options = request.data if isinstance(request.data, dict) else {}
        async with self._changed:
            old = self._current(key)
            for field, wanted in (options.get('preconditions') or {}).items():
                if wanted and wanted != old['metadata'].get(field):
                    raise api_error(409, 'Conflict', f'Precondition failed: {field} in precondition: '
                                    f"{wanted}, {field} in object meta: {old['metadata'].get(field)}")
            return _reply(self._remove(key, old))

    async def _delete_all(self, request: rendering.Request, key: Key) -> rendering.Response:
        match = crd.selector(request.params)
        async with self._changed:
            gone = [self._remove(k, obj) for k, obj in self._stored(key[0], key[1]) if match(obj)]
            return _reply({'apiVersion': _api_version(key[0]), 'kind': f'{self.resources[key[0]].kind}List',
                           'metadata': {'resourceVersion': str(self._rv)}, 'items': gone})

    def _remove(self, key: Key, old: dict[str, Any]) -> dict[str, Any]:
        """Delete, or only mark for deletion while finalizers remain (under the lock)."""
        if old['metadata'].get('deletionTimestamp'):
            return old
        if old['metadata'].get('finalizers'):
            new = copy.deepcopy(old)
            new['metadata']['deletionTimestamp'] = crd.now()
            return self._commit(key, 'MODIFIED', new, old)
        return self._drop(key, old)

    def _drop(self, key: Key, old: dict[str, Any]) -> dict[str, Any]:
        obj = self._commit(key, 'DELETED', None, old)
        if key[0] == CRDS:  # a deleted CRD takes its resources and their objects with it
            for cr in crd.custom_resources(old):
                res = kmock.resource(cr.group, cr.version, cr.plural)
                for child_key, child in self._stored(res, None):
                    self._commit(child_key, 'DELETED', None, child)
                self._crs.pop(res, None)
                del self.resources[res]
        return obj

    def _register(self, crs: list[crd.CustomResource]) -> None:
        """defect 11: a created or changed CRD serves its resources at once (kmock only stored it)."""
        for cr in crs:
            res = kmock.resource(cr.group, cr.version, cr.plural)
            subresources = {name for name, on in (('status', cr.status), ('scale', cr.scale)) if on}
            self.resources[res] = kmock.ResourceInfo(
                kind=cr.kind, singular=cr.singular, namespaced=cr.namespaced, verbs=CR_VERBS,
                shortnames=cr.short_names, categories=cr.categories, subresources=subresources)
            self._crs[res] = cr

    def _commit(self, key: Key, kind: str, obj: dict[str, Any] | None,
                old: dict[str, Any] | None) -> dict[str, Any]:
        """Store a version (or a deletion), bump the resourceVersion, log the event (under the lock)."""
        self._rv += 1
        if obj is None:
            obj = copy.deepcopy(old)
            self._objects[key].delete()
        elif key in self._objects:
            self._objects[key].create(obj)
        else:
            self._objects[key] = obj
        obj['metadata']['resourceVersion'] = str(self._rv)  # defect 3: kmock never set or bumped it
        self._log.append((key, kind, copy.deepcopy(obj), old))
        if len(self._log) > self.event_limit:
            self._log_base += len(self._log) // 2
            del self._log[: len(self._log) // 2]
        if self.history_limit:
            del self._objects[key].history[: -self.history_limit]
        self._changed.notify_all()
        return obj

    def _current(self, key: Key) -> dict[str, Any]:
        if not self._exists(key):
            raise api_error(404, 'NotFound', f'{_qualified(key[0])} "{key[2]}" not found',
                            name=key[2], group=key[0].group, kind=key[0].plural)
        return copy.deepcopy(self._objects[key].raw)

    def _exists(self, key: Key) -> bool:
        return key in self._objects and not self._objects[key].deleted

    def _stored(self, res: kmock.resource, ns: str | None) -> list[tuple[Key, dict[str, Any]]]:
        found = [(key, obj.raw) for key, obj in self._objects.items()
                 if key[0] == res and not obj.deleted and (ns is None or key[1] == ns)]
        return sorted(found, key=lambda item: (item[0][1] or '', item[0][2]))

    def _scale_paths(self, res: kmock.resource) -> dict[str, str]:
        cr = self._crs.get(res)
        paths = cr.scale if cr else crd.BUILTIN_SCALE.get(res.plural)
        return paths or {'specReplicasPath': '.spec.replicas'}

    async def _watch(self, request: rendering.Request, key: Key) -> rendering.Response:
        match = crd.selector(request.params, request.name)
        table = crd.table_args(_header(request, 'Accept'), request.params, self._crs.get(key[0]))
        since = request.params.get('resourceVersion', '')
        async with self._lock:
            # defects 6 and 7: the starting point is taken under the store's lock, so no event falls between
            # the replay and the live stream, and a given resourceVersion replays only the later events.
            if since in ('', '0'):
                initial = [('ADDED', obj) for _, obj in self._stored(key[0], key[1]) if match(obj)]
                cursor = self._rv
            else:
                initial, cursor = [], min(_integer(since, 'resourceVersion'), self._rv)
        timeout = _integer(request.params.get('timeoutSeconds') or '0', 'timeoutSeconds')
        stream = self._stream(key, match, initial, cursor, table, timeout)
        return _reply(stream)  # defect 10: with a JSON content type, not octet-stream

    async def _stream(self, key: Key, match: Any, initial: list[tuple[str, Any]], cursor: int,
                      table: tuple[Any, ...] | None, timeout: int) -> Any:
        yield b''  # kmock sends the headers with the first chunk: send them now, as the API server does
        for kind, obj in initial:
            yield _event(kind, obj, table)
        deadline = asyncio.get_running_loop().time() + timeout if timeout else None
        while True:
            async with self._changed:
                while cursor >= self._rv and not self._closing:
                    if not await _wait(self._changed, deadline):
                        return
                expired = cursor < self._log_base
                entries = [] if self._closing or expired else self._log[cursor - self._log_base:]
                cursor = self._rv
            if self._closing:
                return
            if expired:  # the client must list again, as kopf and client-go do on 410
                yield {'type': 'ERROR', 'object': {'kind': 'Status', 'apiVersion': 'v1', 'status': 'Failure',
                                                   'reason': 'Expired', 'code': 410,
                                                   'message': 'too old resource version'}}
                return
            for (res, ns, _), kind, obj, old in entries:
                seen = crd.seen_as(kind, obj, old, match) if res == key[0] and key[1] in (None, ns) else None
                if seen:
                    yield _event(seen, obj, table)


def _reply(payload: Any, status: int = 200) -> rendering.Response:
    # Always with a status: kmock otherwise keeps the previous one on the (shared) fallback reaction.
    return rendering.Response(status=status, headers={'Content-Type': 'application/json'}, payload=payload)


def _event(kind: str, obj: dict[str, Any], table: tuple[Any, ...] | None) -> dict[str, Any]:
    rv = obj['metadata']['resourceVersion']
    return {'type': kind, 'object': crd.table([obj], *table, rv) if table else obj}


async def _wait(changed: asyncio.Condition, deadline: float | None) -> bool:
    timeout = None if deadline is None else deadline - asyncio.get_running_loop().time()
    try:
        await asyncio.wait_for(changed.wait(), timeout)
    except TimeoutError:
        return False
    return True


def _patched(old: dict[str, Any], request: rendering.Request, body: Any, custom: bool) -> dict[str, Any]:
    """The object after a PATCH of any of the API server's patch types."""
    if isinstance(body, list):  # RFC 6902 JSON patch, whatever the Content-Type says
        try:
            return jsonpatch.apply_patch(old, body)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:  # defect 4: was a 500
            raise api_error(422, 'Invalid', f'the server rejected our request: {e}') from e
    if not isinstance(body, dict):
        raise api_error(400, 'BadRequest', 'the body of the request is not a JSON object or array')
    if _content_type(request) == SMP and custom:
        raise api_error(415, 'UnsupportedMediaType', 'strategic merge patch is not supported for custom '
                        'resources')
    if _content_type(request) in (SMP, APPLY) and not custom:  # server-side apply: approximated by SMP
        return strategic_merge_patch(old, body)
    return merge_patch(old, body)


def _admitted(old: dict[str, Any], new: dict[str, Any], request: rendering.Request, res: kmock.resource,
              cr: crd.CustomResource | None) -> dict[str, Any]:
    """Keep the server-owned fields, validate custom resources, bump the generation on spec changes."""
    if not isinstance(new, dict):
        raise api_error(400, 'BadRequest', 'the body of the request is not a JSON object')
    meta = new['metadata'] = dict(new.get('metadata') or {})  # a patch may share it with old
    for field in _SERVER_OWNED:
        if field in old['metadata']:
            meta[field] = old['metadata'][field]
        else:
            meta.pop(field, None)
    new['apiVersion'], new['kind'] = old['apiVersion'], old['kind']
    added = sorted(set(meta.get('finalizers') or []) - set(old['metadata'].get('finalizers') or []))
    if meta.get('deletionTimestamp') and added:
        raise crd.invalid(old['kind'], res.group, meta['name'], [{
            'reason': 'FieldValueForbidden', 'field': 'metadata.finalizers', 'message': 'Forbidden: no new '
            f'finalizers can be added if the object is being deleted, found new finalizers {added}'}])
    if cr:
        new = cr.admit(new, old, request.params.get('fieldValidation') == 'Strict')
    if _spec(new) != _spec(old):
        new['metadata']['generation'] = old['metadata'].get('generation', 1) + 1
    return new


def _spec(obj: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in obj.items() if key not in ('metadata', 'status')}


def _header(request: rendering.Request, name: str) -> str:
    return next((v for k, v in request.headers.items() if k.lower() == name.lower()), '')


def _content_type(request: rendering.Request) -> str:
    return _header(request, 'Content-Type').split(';')[0].strip().lower()


def _body(request: rendering.Request) -> Any:
    if _content_type(request).endswith('yaml'):
        return yaml.safe_load(request.text)
    return copy.deepcopy(request.data)  # kmock keeps the parsed body in its request log


def _create_namespace(info: kmock.ResourceInfo, namespace: str | None, meta: dict[str, Any]) -> str | None:
    """defect 2: the namespace comes from the URL (the kubernetes client puts it only there)."""
    if not info.namespaced:
        meta.pop('namespace', None)
        return None
    ns = namespace or meta.get('namespace') or 'default'
    if meta.get('namespace', ns) != ns:
        raise api_error(400, 'BadRequest', 'the namespace of the provided object does not match the '
                        'namespace sent on the request')
    meta['namespace'] = ns
    return ns


def _check_name(kind: str, res: kmock.resource, name: str | None) -> None:
    if not name:
        raise crd.invalid(kind, res.group, '', [{
            'reason': 'FieldValueRequired', 'field': 'metadata.name',
            'message': 'Required value: name or generateName is required'}])
    if res.group != 'rbac.authorization.k8s.io' and (len(name) > 253 or not _NAME.fullmatch(name)):
        raise crd.invalid(kind, res.group, name, [{'reason': 'FieldValueInvalid', 'field': 'metadata.name',
                                                   'message': f'Invalid value: "{name}": {_BAD_NAME}'}])


def _integer(text: str, name: str) -> int:
    if not text.isdigit():
        raise api_error(400, 'BadRequest', f'invalid {name}: {text!r}')
    return int(text)


def _api_version(res: kmock.resource) -> str:
    return f'{res.group}/{res.version}' if res.group else res.version


def _qualified(res: kmock.resource) -> str:
    return f'{res.plural}.{res.group}' if res.group else res.plural
