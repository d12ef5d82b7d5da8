"""What the Kubernetes API server does beyond storing objects, as pure functions on dicts.

Owns the model of a CustomResourceDefinition (apiextensions.k8s.io/v1): pruning, schema defaults, schema
and CEL (x-kubernetes-validations) validation with 422s worded as the API server words them; the status and
scale subresources; Tables from printer columns; label and field selectors. No I/O, no kubernetes client.
"""

import copy
import dataclasses
import datetime
import json
import re
from collections.abc import Callable
from typing import Any

import celpy
import jsonschema
from kmock import KubernetesError

# The columns the API server shows for a CRD without additionalPrinterColumns (and here for built-ins).
AGE_COLUMNS = [{'name': 'Age', 'type': 'date', 'jsonPath': '.metadata.creationTimestamp'}]
NAME_COLUMN = {'name': 'Name', 'type': 'string', 'format': 'name', 'priority': 0,
               'description': 'Name must be unique within a namespace.'}
# Built-in kinds with a scale subresource: where the Scale's fields live in the object.
BUILTIN_SCALE = {plural: {'specReplicasPath': '.spec.replicas', 'statusReplicasPath': '.status.replicas',
                          'labelSelectorPath': '.spec.selector'}
                 for plural in ('deployments', 'statefulsets', 'replicasets', 'replicationcontrollers')}
_ROOT_KEYS = ('apiVersion', 'kind', 'metadata')  # never pruned or validated from the CRD's schema
_SCHEMA_KEYS = ('enum', 'minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum', 'minLength',
                'maxLength', 'pattern', 'minItems', 'maxItems', 'uniqueItems', 'minProperties',
                'maxProperties', 'multipleOf', 'required')
_MISSING = object()
_LABEL_TERM = re.compile(r'\s*(?P<neg>!?)\s*(?P<key>[\w./-]+)\s*(?:(?P<op>==|=|!=)\s*(?P<value>[\w.-]*)'
                         r'|(?P<set>in|notin)\s*\((?P<values>[^)]*)\))?\s*')
# One step of a printer column's JSONPath: .key | [N] | [*] | ['key'] | [?(@.key=="value")]
_JSONPATH_STEP = re.compile(r'\.([^.\[]+)|\[(\d+|\*)\]|\[[\'"]([^\'"]+)[\'"]\]'
                            r'|\[\?\(@\.([\w.]+)\s*==\s*[\'"]([^\'"]*)[\'"]\)\]')
_FIELD_TERM = re.compile(r'\s*(?P<key>[\w./-]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^,]*?)\s*')
# Schema errors after which the API server skips the CEL rules, and what it says instead.
_BLOCKING = ('FieldValueNotSupported', 'FieldValueRequired', 'FieldValueTooLong', 'FieldValueTooMany',
             'FieldValueTypeInvalid')
_UNCHECKED = ('Invalid value: "null": some validation rules were not checked because the object was '
              'invalid; correct the existing errors to complete validation')


def api_error(status: int, reason: str, message: str, **details: Any) -> KubernetesError:
    return KubernetesError(status=status, reason=reason, message=message, details=details)


def invalid(kind: str, group: str, name: str, causes: list[dict[str, str]]) -> KubernetesError:
    """A 422 whose message and causes read like the API server's (kubectl prints the causes)."""
    texts = [f"{c['field']}: {c['message']}" if c.get('field') else c['message'] for c in causes]
    text = texts[0] if len(texts) == 1 else f"[{', '.join(texts)}]"
    qualified = f'{kind}.{group}' if group else kind
    return api_error(422, 'Invalid', f'{qualified} "{name}" is invalid: {text}',
                     name=name, group=group, kind=kind, causes=causes)


@dataclasses.dataclass
class CustomResource:
    """One served version of a CRD: its names, schema, subresources and printer columns."""
    group: str
    version: str
    plural: str
    kind: str
    singular: str
    namespaced: bool
    short_names: list[str]
    categories: list[str]
    schema: dict[str, Any]
    status: bool
    scale: dict[str, str] | None
    columns: list[dict[str, Any]]
    _validator: Any = dataclasses.field(init=False, repr=False)
    _programs: dict[str, Any] = dataclasses.field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        translated = _translate(self.schema)
        for key in _ROOT_KEYS:
            translated.get('properties', {}).pop(key, None)
        jsonschema.Draft4Validator.check_schema(translated)
        self._validator = jsonschema.Draft4Validator(translated)
        env = celpy.Environment()
        for rule in _rules(self.schema):
            self._programs[rule] = env.program(env.compile(rule))

    def admit(self, obj: dict[str, Any], old: dict[str, Any] | None, strict: bool) -> dict[str, Any]:
        """Prune unknown fields, apply defaults, validate; return the object to store or raise a 422."""
        obj = copy.deepcopy(obj)
        pruned: list[str] = []
        _prune_and_default(obj, self.schema, '', pruned, root=True)
        if strict and pruned:
            raise api_error(400, 'BadRequest', f'strict decoding error: unknown field "{pruned[0]}"')
        body = {key: value for key, value in obj.items() if key not in _ROOT_KEYS}
        causes = sorted((_cause(e) for e in self._validator.iter_errors(body)), key=lambda c: c['field'])
        if any(c['reason'] in _BLOCKING for c in causes):  # as the API server's hasBlockingErr()
            causes.append({'reason': 'FieldValueInvalid', 'field': '<nil>', 'message': _UNCHECKED})
        else:
            old_body = None if old is None else {k: v for k, v in old.items() if k not in _ROOT_KEYS}
            self._check_rules(body, old_body, self.schema, '', causes)
        if causes:
            raise invalid(self.kind, self.group, obj['metadata'].get('name', ''), causes)
        return obj

    def _check_rules(self, value: Any, old: Any, schema: dict[str, Any], path: str,
                     causes: list[dict[str, str]]) -> None:
        for rule in schema.get('x-kubernetes-validations', []):
            if 'oldSelf' in rule['rule'] and old in (None, _MISSING):
                continue  # a transition rule: only on updates, with an old value to compare
            ok, error = self._evaluate(rule['rule'], value, old)
            if not ok:
                message = error or rule.get('message') or f"failed rule: {rule['rule']}"
                field = '.'.join(p for p in (path, rule.get('fieldPath', '').lstrip('.')) if p)
                causes.append({'reason': 'FieldValueInvalid', 'field': field,
                               'message': f'Invalid value: "{_json_type(value)}": {message}'})
        for key, sub in schema.get('properties', {}).items():
            if isinstance(value, dict) and key in value:
                old_sub = old.get(key, _MISSING) if isinstance(old, dict) else _MISSING
                self._check_rules(value[key], old_sub, sub, _join(path, key), causes)
        extra = schema.get('additionalProperties')
        for key, item in (value.items() if isinstance(value, dict) and isinstance(extra, dict) else ()):
            old_item = old.get(key, _MISSING) if isinstance(old, dict) else _MISSING
            self._check_rules(item, old_item, extra, _join(path, key), causes)
        if isinstance(value, list) and isinstance(schema.get('items'), dict):
            for index, item in enumerate(value):
                self._check_rules(item, _MISSING, schema['items'], f'{path}[{index}]', causes)

    def _evaluate(self, rule: str, value: Any, old: Any) -> tuple[bool, str | None]:
        activation = {'self': celpy.json_to_cel(value)}
        if old not in (None, _MISSING):
            activation['oldSelf'] = celpy.json_to_cel(old)
        try:
            result = self._programs[rule].evaluate(activation)
        except Exception as e:  # CELEvalError and friends: the API server rejects the object too
            return False, str(e.args[0] if e.args else e)
        if isinstance(result, celpy.CELEvalError):
            return False, str(result.args[0])
        return bool(result), None


def custom_resources(crd: dict[str, Any]) -> list[CustomResource]:
    """The served versions of a CRD, or a 422 naming what is wrong with it."""
    name = crd.get('metadata', {}).get('name', '')
    try:
        spec, names = crd['spec'], crd['spec']['names']
        if name != f"{names['plural']}.{spec['group']}":
            raise ValueError(f'metadata.name must be spec.names.plural+"."+spec.group: {name}')
        return [CustomResource(
            group=spec['group'], version=v['name'], plural=names['plural'], kind=names['kind'],
            singular=names.get('singular') or names['kind'].lower(),
            namespaced=spec.get('scope', 'Namespaced') == 'Namespaced',
            short_names=list(names.get('shortNames', [])), categories=list(names.get('categories', [])),
            schema=(v.get('schema') or {}).get('openAPIV3Schema')
            or {'type': 'object', 'x-kubernetes-preserve-unknown-fields': True},
            status='status' in (v.get('subresources') or {}),
            scale=(v.get('subresources') or {}).get('scale'),
            columns=v.get('additionalPrinterColumns') or AGE_COLUMNS,
        ) for v in spec['versions'] if v.get('served', True)]
    except Exception as e:  # a malformed CRD (missing names, bad schema, CEL that does not compile)
        message = f'Invalid value: {e}' if not isinstance(e, KeyError) else f'Required value: {e}'
        raise invalid('CustomResourceDefinition', 'apiextensions.k8s.io', name,
                      [{'reason': 'FieldValueInvalid', 'field': 'spec', 'message': message}]) from e


def _rules(schema: dict[str, Any]) -> list[str]:
    found = [rule['rule'] for rule in schema.get('x-kubernetes-validations', [])]
    for sub in [*schema.get('properties', {}).values(), schema.get('items'),
                schema.get('additionalProperties')]:
        if isinstance(sub, dict):
            found += _rules(sub)
    return found


def _translate(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI v3 structural schema -> JSON Schema draft 4 (whose boolean exclusiveMinimum it shares)."""
    out: dict[str, Any] = {key: schema[key] for key in _SCHEMA_KEYS if key in schema}
    if schema.get('x-kubernetes-int-or-string'):
        out['anyOf'] = [{'type': 'integer'}, {'type': 'string'}]
    elif 'type' in schema:
        out['type'] = [schema['type'], 'null'] if schema.get('nullable') else schema['type']
    if schema.get('nullable') and 'enum' in out:
        out['enum'] = [*out['enum'], None]
    if 'properties' in schema:
        out['properties'] = {key: _translate(sub) for key, sub in schema['properties'].items()}
    for key in ('items', 'additionalProperties', 'not'):
        if isinstance(schema.get(key), dict):
            out[key] = _translate(schema[key])
    for key in ('allOf', 'anyOf', 'oneOf'):
        if key in schema:
            out[key] = [_translate(sub) for sub in schema[key]]
    return out


def _prune_and_default(value: Any, schema: dict[str, Any], path: str, pruned: list[str],
                       root: bool = False) -> None:
    """Drop fields the schema does not know, then fill defaults, recursively (as the API server)."""
    if isinstance(value, list) and isinstance(schema.get('items'), dict):
        for index, item in enumerate(value):
            _prune_and_default(item, schema['items'], f'{path}[{index}]', pruned)
    if not isinstance(value, dict):
        return
    props, extra = schema.get('properties', {}), schema.get('additionalProperties')
    keep = schema.get('x-kubernetes-preserve-unknown-fields') or extra is True or isinstance(extra, dict)
    embedded = root or schema.get('x-kubernetes-embedded-resource')
    for key in list(value):
        if embedded and key in _ROOT_KEYS:
            continue
        if key not in props and not keep:
            pruned.append(_join(path, key))
            del value[key]
        elif key not in props and isinstance(extra, dict):
            _prune_and_default(value[key], extra, _join(path, key), pruned)
    for key, sub in props.items():
        if (embedded and key in _ROOT_KEYS) or ('default' not in sub and key not in value):
            continue
        if value.get(key) is None and 'default' in sub and not sub.get('nullable'):
            value[key] = copy.deepcopy(sub['default'])
        _prune_and_default(value[key], sub, _join(path, key), pruned)


def _cause(error: jsonschema.ValidationError) -> dict[str, str]:
    """One jsonschema error as a Kubernetes field error (reason, field, message)."""
    field = ''.join(f'[{p}]' if isinstance(p, int) else f'.{p}' for p in error.absolute_path).lstrip('.')
    v, limit, value = error.validator, error.validator_value, error.instance
    shown = _show(value)
    reason, message = 'FieldValueInvalid', f'Invalid value: {shown}: {field} in body {error.message}'
    if v == 'required':
        field = _join(field, error.message.split("'")[1])
        reason, message = 'FieldValueRequired', 'Required value'
    elif v == 'enum':
        reason = 'FieldValueNotSupported'
        message = f"Unsupported value: {shown}: supported values: {', '.join(json.dumps(x) for x in limit)}"
    elif v == 'type' or (v == 'anyOf' and limit == [{'type': 'integer'}, {'type': 'string'}]):
        wanted, given = limit if v == 'type' else 'integer or string', _json_type(value)
        reason = 'FieldValueTypeInvalid'
        message = f'Invalid value: "{given}": {field} in body must be of type {wanted}: "{given}"'
    elif v in ('minimum', 'maximum'):
        strict = error.schema.get('exclusiveMinimum' if v == 'minimum' else 'exclusiveMaximum')
        side = 'greater than' if v == 'minimum' else 'less than'
        side += '' if strict else ' or equal to'
        message = f'Invalid value: {shown}: {field} in body should be {side} {limit}'
    elif v == 'maxLength':
        reason, message = 'FieldValueTooLong', f'Too long: may not be longer than {limit}'
    elif v == 'minLength':
        message = f'Invalid value: {shown}: {field} in body should be at least {limit} chars long'
    elif v == 'pattern':
        message = f"Invalid value: {shown}: {field} in body should match '{limit}'"
    elif v in ('maxItems', 'maxProperties'):
        unit = 'items' if v == 'maxItems' else 'properties'
        reason, message = 'FieldValueTooMany', f'Too many: {len(value)}: must have at most {limit} {unit}'
    elif v in ('minItems', 'minProperties'):
        unit = 'items' if v == 'minItems' else 'properties'
        message = f'Invalid value: {len(value)}: {field} in body should have at least {limit} {unit}'
    elif v == 'multipleOf':
        message = f'Invalid value: {shown}: {field} in body should be a multiple of {limit}'
    return {'reason': reason, 'field': field, 'message': message}


def _json_type(value: Any) -> str:
    for kind, types in (('boolean', bool), ('integer', int), ('number', float), ('string', str),
                        ('array', list), ('object', dict)):
        if isinstance(value, types):
            return kind
    return 'null'


def _show(value: Any) -> str:
    return f'"{_json_type(value)}"' if isinstance(value, dict | list) else json.dumps(value)


def _join(path: str, key: str) -> str:
    return f'{path}.{key}' if path else key


def get_path(obj: Any, path: str) -> Any:
    """The first value at a simple JSONPath (`.a.b`, `[0]`, `['k']`, `[?(@.type=="Ready")]`), or None."""
    nodes = [obj]
    for key, index, quoted, f_key, f_value in _JSONPATH_STEP.findall(path.strip().strip('{}')):
        found: list[Any] = []
        for node in nodes:
            if (key or quoted) and isinstance(node, dict) and (key or quoted) in node:
                found.append(node[key or quoted])
            elif index == '*' and isinstance(node, list):
                found.extend(node)
            elif index and index != '*' and isinstance(node, list) and int(index) < len(node):
                found.append(node[int(index)])
            elif f_key and isinstance(node, list):
                found.extend(n for n in node if str(get_path(n, '.' + f_key)) == f_value)
        nodes = found
    return nodes[0] if nodes else None


def set_path(obj: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path (`.spec.replicas`), creating the dicts on the way."""
    *parents, last = path.strip('.').split('.')
    for key in parents:
        obj = obj.setdefault(key, {})
    obj[last] = value


def scale_of(obj: dict[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    """The autoscaling/v1 Scale that the scale subresource serves for an object."""
    meta = obj['metadata']
    selector = get_path(obj, paths.get('labelSelectorPath', '')) if paths.get('labelSelectorPath') else None
    if isinstance(selector, dict):  # built-ins keep a LabelSelector; a Scale carries its string form
        selector = ','.join(f'{k}={v}' for k, v in selector.get('matchLabels', {}).items())
    status = {'replicas': get_path(obj, paths.get('statusReplicasPath', '')) or 0}
    if selector:
        status['selector'] = selector
    return {'kind': 'Scale', 'apiVersion': 'autoscaling/v1',
            'metadata': {k: meta[k] for k in ('name', 'namespace', 'uid', 'resourceVersion',
                                              'creationTimestamp') if k in meta},
            'spec': {'replicas': get_path(obj, paths['specReplicasPath']) or 0}, 'status': status}


def rescale(old: dict[str, Any], scale: Any, paths: dict[str, str]) -> dict[str, Any]:
    """The object after a write of its Scale (checked as the API server checks a Scale)."""
    replicas = (scale.get('spec') or {}).get('replicas') if isinstance(scale, dict) else None
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        raise invalid('Scale', 'autoscaling', old['metadata']['name'], [{
            'reason': 'FieldValueInvalid', 'field': 'spec.replicas',
            'message': f'Invalid value: {replicas}: must be greater than or equal to 0'}])
    new = copy.deepcopy(old)
    set_path(new, paths['specReplicasPath'], replicas)
    return new


def isolate_status(old: dict[str, Any], new: dict[str, Any], subresource: str | None) -> dict[str, Any]:
    """With a status subresource, a write to /status changes status only; one to the object, never."""
    out, source = (copy.deepcopy(old), new) if subresource == 'status' else (new, old)
    out.pop('status', None)
    if 'status' in source:
        out['status'] = source['status']
    return out


def crd_status(crd: dict[str, Any]) -> dict[str, Any]:
    """What the API server's CRD controllers write: names accepted, established."""
    conditions = [{'type': kind, 'status': 'True', 'reason': reason, 'message': message,
                   'lastTransitionTime': now()}
                  for kind, reason, message in (('NamesAccepted', 'NoConflicts', 'no conflicts found'),
                                                ('Established', 'InitialNamesAccepted',
                                                 'the initial names have been accepted'))]
    return {'acceptedNames': dict(crd['spec']['names']), 'conditions': conditions,
            'storedVersions': [v['name'] for v in crd['spec']['versions'] if v.get('storage')]}


def selector(params: dict[str, str], name: str | None = None) -> Callable[[dict[str, Any]], bool]:
    """A predicate for ?labelSelector= and ?fieldSelector= (kmock ignored both), and a watched name."""
    tests = []
    for term in re.split(r',(?![^()]*\))', params.get('labelSelector', '')):
        if term.strip():
            m = _LABEL_TERM.fullmatch(term) or _bad_selector(term)
            values = {v.strip() for v in (m['values'] or m['value'] or '').split(',')}
            kind = {'=': 'in', '==': 'in', '!=': 'notin'}.get(m['op']) or m['set'] or m['neg'] or 'exists'
            tests.append(lambda o, k=m['key'], vs=values, kind=kind: _label_test(o, k, vs, kind))
    for term in filter(str.strip, params.get('fieldSelector', '').split(',')):
        m = _FIELD_TERM.fullmatch(term) or _bad_selector(term)
        tests.append(lambda o, m=m: (_field(o, m['key']) == m['value']) == (m['op'] != '!='))
    if name is not None:
        tests.append(lambda o: o['metadata']['name'] == name)
    return lambda obj: all(test(obj) for test in tests)


def seen_as(kind: str, obj: dict[str, Any], old: dict[str, Any] | None,
            match: Callable[..., bool]) -> str | None:
    """How a selective watch sees an event: objects moving into or out of its selector come or go."""
    matches, matched = match(obj), old is not None and match(old)
    if kind == 'MODIFIED' and matches != matched:
        return 'ADDED' if matches else 'DELETED'
    return kind if matches else None


def _label_test(obj: dict[str, Any], key: str, values: set[str], kind: str) -> bool:
    labels = obj['metadata'].get('labels') or {}
    if kind in ('exists', '!'):
        return (key in labels) == (kind == 'exists')
    return (labels.get(key) in values) == (kind == 'in')


def _field(obj: dict[str, Any], path: str) -> str:
    value = get_path(obj, '.' + path)
    return '' if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _bad_selector(term: str) -> Any:
    raise api_error(400, 'BadRequest', f'unable to parse requirement: {term!r}')


def table_args(accept: str, params: dict[str, str], cr: CustomResource | None) -> tuple[Any, ...] | None:
    """(columns, includeObject) when kubectl asks for a Table (`Accept: ...;as=Table;...`), else None."""
    if 'as=Table' not in accept:
        return None
    return (cr.columns if cr else AGE_COLUMNS, params.get('includeObject', 'PartialObjectMetadata'))


def table(objs: list[dict[str, Any]], columns: list[dict[str, Any]], include: str,
          rv: str) -> dict[str, Any]:
    """A meta.k8s.io/v1 Table: Name plus the printer columns, as kubectl asks with `as=Table`."""
    keys = ('name', 'type', 'format', 'description', 'priority')
    defs = [NAME_COLUMN] + [{k: c.get(k, 0 if k == 'priority' else '') for k in keys} for c in columns]
    rows = []
    for obj in objs:
        row: dict[str, Any] = {'cells': [obj['metadata']['name']] + [_cell(c, obj) for c in columns]}
        if include == 'Object':
            row['object'] = obj
        elif include != 'None':
            row['object'] = {'kind': 'PartialObjectMetadata', 'apiVersion': 'meta.k8s.io/v1',
                             'metadata': obj['metadata']}
        rows.append(row)
    return {'kind': 'Table', 'apiVersion': 'meta.k8s.io/v1', 'metadata': {'resourceVersion': rv},
            'columnDefinitions': defs, 'rows': rows}


def _cell(column: dict[str, Any], obj: dict[str, Any]) -> Any:
    value, kind = get_path(obj, column['jsonPath']), column['type']
    if value is None:
        return None
    if kind == 'date' and isinstance(value, str):
        return _age(value)
    if kind == 'integer' and isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    if kind == 'number' and isinstance(value, int | float):
        return value
    if kind == 'boolean' and isinstance(value, bool):
        return value
    if kind == 'string':
        return value if isinstance(value, str) else json.dumps(value)
    return None


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


def _age(timestamp: str) -> str:
    """Kubernetes' duration.HumanDuration of the time since a timestamp (`5s`, `3m20s`, `2d4h`)."""
    try:
        then = datetime.datetime.fromisoformat(timestamp.replace('Z', '+00:00'))
    except ValueError:
        return '<invalid>'
    s = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    m, h, d = s // 60, s // 3600, s // 86400
    if s < 0:
        return '0s'
    for limit, text in ((120, f'{s}s'), (600, f'{m}m{s % 60}s' if s % 60 else f'{m}m'), (3 * 3600, f'{m}m'),
                        (8 * 3600, f'{h}h{m % 60}m' if m % 60 else f'{h}h'), (48 * 3600, f'{h}h'),
                        (8 * 86400, f'{d}d{h % 24}h' if h % 24 else f'{d}d'), (730 * 86400, f'{d}d')):
        if s < limit:
            return text
    return f'{d // 365}y'
