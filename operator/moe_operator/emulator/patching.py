"""The API server's merge patches over plain JSON objects: RFC 7386 merge patch and strategic merge patch.

Strategic merge is approximated as the API server applies it to the operator's built-in objects: maps
merge, lists with a known merge key merge by it, other lists are replaced. Pure functions, no I/O.
"""

import copy
from typing import Any

# Strategic-merge keys of the lists in the operator's built-in objects (other lists are replaced whole).
_MERGE_KEYS = {'containers': 'name', 'initContainers': 'name', 'ephemeralContainers': 'name', 'env': 'name',
               'volumes': 'name', 'volumeMounts': 'mountPath', 'volumeDevices': 'devicePath',
               'imagePullSecrets': 'name', 'conditions': 'type', 'ownerReferences': 'uid',
               'hostAliases': 'ip', 'ports': 'containerPort'}


def merge_patch(old: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(old) if isinstance(old, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def strategic_merge_patch(old: Any, patch: Any) -> Any:
    """Strategic merge patch, approximated: maps merge, lists with a known merge key merge by it, and the
    `$patch`, `$setElementOrder/` and `$deleteFromPrimitiveList/` directives are honoured."""
    if not isinstance(patch, dict) or not isinstance(old, dict) or patch.get('$patch') == 'replace':
        return _plain(patch)
    out = dict(old)
    for key, value in patch.items():
        if key.startswith('$'):
            continue
        if value is None or (isinstance(value, dict) and value.get('$patch') == 'delete'):
            out.pop(key, None)
        elif isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = _merge_list(key, out[key], value)
        else:
            out[key] = strategic_merge_patch(out.get(key), value)
    for key, value in patch.items():
        field = key.partition('/')[2]
        if key.startswith('$deleteFromPrimitiveList/') and isinstance(out.get(field), list):
            out[field] = [item for item in out[field] if item not in value]
        elif key.startswith('$setElementOrder/') and isinstance(out.get(field), list):
            merge_key = _merge_key(field, value)
            rank = {(item.get(merge_key) if merge_key else item): i for i, item in enumerate(value)
                    if isinstance(item.get(merge_key) if merge_key else item, str | int)}
            out[field] = sorted(out[field], key=lambda item: rank.get(
                item.get(merge_key) if merge_key else item, len(rank)))
    return out


def _merge_list(field: str, old: list[Any], patch: list[Any]) -> list[Any]:
    if field == 'finalizers':  # a primitive list with patchStrategy merge
        return old + [item for item in patch if item not in old]
    merge_key = _merge_key(field, old + patch)
    if merge_key is None or any(item.get('$patch') == 'replace' for item in patch):
        return [_plain(item) for item in patch if not (isinstance(item, dict) and '$patch' in item)]
    out = list(old)
    for item in patch:
        index = next((i for i, o in enumerate(out) if o.get(merge_key) == item.get(merge_key)), None)
        if item.get('$patch') == 'delete':
            out = [o for i, o in enumerate(out) if i != index]
        elif index is None:
            out.append(_plain(item))
        else:
            out[index] = strategic_merge_patch(out[index], item)
    return out


def _merge_key(field: str, items: list[Any]) -> str | None:
    key = _MERGE_KEYS.get(field)
    if field == 'ports' and not all(isinstance(i, dict) and 'containerPort' in i for i in items):
        key = 'port'  # Service ports merge on port, container ports on containerPort
    return key if key and all(isinstance(i, dict) and key in i for i in items) else None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not k.startswith('$')}
    return [_plain(v) for v in value] if isinstance(value, list) else value
