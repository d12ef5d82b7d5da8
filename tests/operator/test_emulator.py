"""The in-repo Kubernetes emulator behaves as an API server for the kubernetes client, kubectl and kopf."""

import json
import os
import selectors
import signal
import subprocess
import sys
import time
import urllib.request

import kmock
import kopf
import pytest
import yaml
from kopf.testing import KopfRunner
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from moe_operator.emulator import running_cluster

WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.test.moefleet.dev}
spec:
  group: test.moefleet.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources:
      status: {}
      scale: {specReplicasPath: .spec.replicas, statusReplicasPath: .status.replicas,
              labelSelectorPath: .status.selector}
    additionalPrinterColumns:
    - {name: Replicas, type: integer, jsonPath: .spec.replicas}
    - {name: Ready, type: string, jsonPath: '.status.conditions[?(@.type=="Ready")].status'}
    - {name: Mode, type: string, jsonPath: .spec.mode}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [replicas]
            x-kubernetes-validations:
            - {rule: self.minReplicas <= self.replicas, message: minReplicas must not exceed replicas}
            properties:
              replicas: {type: integer, minimum: 0, maximum: 10}
              minReplicas: {type: integer, minimum: 0, default: 0}
              mode: {type: string, enum: [fast, slow], default: fast}
              limits:
                type: object
                default: {}
                properties:
                  burst: {type: integer, default: 3}
          status:
            type: object
            x-kubernetes-preserve-unknown-fields: true
"""
WIDGETS = ('test.moefleet.dev', 'v1', 'default', 'widgets')


def widget(name: str, labels: dict[str, str] | None = None, **spec: object) -> str:
    return yaml.safe_dump({'apiVersion': 'test.moefleet.dev/v1', 'kind': 'Widget',
                           'metadata': {'name': name, 'labels': labels or {}}, 'spec': spec})


def api_client(emulator) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(emulator.kubeconfig))


def custom(emulator) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client(emulator))


def raw_lines(url: str) -> list[dict]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return [json.loads(line) for line in response if line.strip()]


def read_until(process: subprocess.Popen, text: str, timeout: float = 10) -> str:
    """A running process's output until it contains `text` (unbuffered reads: select() sees all of it)."""
    seen, deadline = b'', time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while text.encode() not in seen and time.monotonic() < deadline:
            if selector.select(deadline - time.monotonic()):
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    break
                seen += chunk
    assert text.encode() in seen, f'{text!r} not in the output: {seen!r}'
    return seen.decode()


@pytest.fixture()
def widgets(kubectl):
    """kubectl, with the Widget CRD applied to the emulator."""
    kubectl('apply', '--validate=false', '-f', '-', input=WIDGET_CRD)
    return kubectl


@pytest.mark.timeout(60)
def test_client_creates_reads_patches_and_deletes_a_configmap(emulator):
    core = client.CoreV1Api(api_client(emulator))
    body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name='cm', labels={'app': 'x'}), data={'k': 'v'})
    created, status_code, _ = core.create_namespaced_config_map_with_http_info('default', body)
    meta = created.metadata
    assert status_code == 201
    assert (meta.namespace, meta.generation) == ('default', 1)
    assert meta.uid and meta.resource_version and meta.creation_timestamp

    assert core.read_namespaced_config_map('cm', 'default').data == {'k': 'v'}
    patched = core.patch_namespaced_config_map('cm', 'default', {'data': {'k': 'w'}})
    assert patched.data == {'k': 'w'}
    assert int(patched.metadata.resource_version) > int(meta.resource_version)
    selected = core.list_namespaced_config_map('default', label_selector='app=x').items
    assert [item.metadata.name for item in selected] == ['cm']
    assert core.list_namespaced_config_map('default', label_selector='app in (y,z)').items == []

    core.delete_namespaced_config_map('cm', 'default')
    with pytest.raises(ApiException) as error:
        core.read_namespaced_config_map('cm', 'default')
    assert error.value.status == 404


@pytest.mark.timeout(60)
def test_client_creates_scales_and_deletes_a_deployment_with_status_kept_apart(emulator):
    apps = client.AppsV1Api(api_client(emulator))
    body = {'apiVersion': 'apps/v1', 'kind': 'Deployment', 'metadata': {'name': 'd'},
            'spec': {'replicas': 1, 'selector': {'matchLabels': {'app': 'd'}},
                     'template': {'metadata': {'labels': {'app': 'd'}},
                                  'spec': {'containers': [{'name': 'main', 'image': 'a:1'},
                                                          {'name': 'side', 'image': 'b:1'}]}}}}
    assert apps.create_namespaced_deployment('default', body).metadata.generation == 1

    patch = {'spec': {'template': {'spec': {'containers': [{'name': 'main', 'image': 'a:2'}]}}}}
    patched = apps.patch_namespaced_deployment('d', 'default', patch)  # strategic merge: by name
    assert [c.image for c in patched.spec.template.spec.containers] == ['a:2', 'b:1']
    assert patched.metadata.generation == 2

    assert apps.patch_namespaced_deployment('d', 'default', {'status': {'replicas': 9}}).status is None
    status = apps.patch_namespaced_deployment_status('d', 'default', {'status': {'replicas': 1}})
    assert (status.status.replicas, status.metadata.generation) == (1, 2)

    scale = apps.patch_namespaced_deployment_scale('d', 'default', {'spec': {'replicas': 3}})
    assert (scale.spec.replicas, scale.status.selector) == (3, 'app=d')
    assert apps.read_namespaced_deployment('d', 'default').metadata.generation == 3

    apps.delete_namespaced_deployment('d', 'default')
    assert apps.list_namespaced_deployment('default').items == []


@pytest.mark.timeout(60)
def test_writes_follow_the_api_servers_rules(emulator):
    core = client.CoreV1Api(api_client(emulator))
    made = core.create_namespaced_config_map('default', {'metadata': {'generateName': 'cm-'}})
    name, rv = made.metadata.name, made.metadata.resource_version
    assert name.startswith('cm-') and len(name) == 8

    with pytest.raises(ApiException) as exists:
        core.create_namespaced_config_map('default', {'metadata': {'name': name}})
    assert exists.value.status == 409
    core.patch_namespaced_config_map(name, 'default', {'data': {'a': '1'}})
    with pytest.raises(ApiException) as stale:
        core.patch_namespaced_config_map(name, 'default', {'metadata': {'resourceVersion': rv}, 'data': {}})
    assert json.loads(stale.value.body)['reason'] == 'Conflict'
    with pytest.raises(ApiException) as failed_test:  # kopf expects a 422 when its test op fails
        core.patch_namespaced_config_map(name, 'default', [
            {'op': 'test', 'path': '/metadata/resourceVersion', 'value': rv},
            {'op': 'remove', 'path': '/data'}])
    assert failed_test.value.status == 422

    core.patch_namespaced_config_map(name, 'default', {'metadata': {'finalizers': ['test/hold']}})
    core.delete_namespaced_config_map(name, 'default')
    held = core.read_namespaced_config_map(name, 'default')
    assert held.metadata.deletion_timestamp and held.metadata.finalizers == ['test/hold']
    core.patch_namespaced_config_map(name, 'default', [{'op': 'remove', 'path': '/metadata/finalizers'}])
    assert core.list_namespaced_config_map('default').items == []


@pytest.mark.timeout(60)
def test_a_reaction_added_by_a_test_injects_a_fault_and_requests_stay_assertable(emulator):
    core = client.CoreV1Api(api_client(emulator))
    core.create_namespaced_config_map('default', {'metadata': {'name': 'cm'}, 'data': {'k': '0'}})
    emulator.call(lambda k: k[kmock.method.PATCH][kmock.resource('', 'v1', 'configmaps')][:1] << 503)
    with pytest.raises(ApiException) as error:
        core.patch_namespaced_config_map('cm', 'default', {'data': {'k': '1'}})
    assert error.value.status == 503
    assert core.patch_namespaced_config_map('cm', 'default', {'data': {'k': '2'}}).data == {'k': '2'}
    assert emulator.call(lambda k: k.objects['v1/configmaps', 'default', 'cm'] >= {'data': {'k': '2'}})
    assert emulator.call(lambda k: len(list(k[kmock.method.PATCH]))) == 2


@pytest.mark.timeout(60)
def test_kubectl_applies_gets_watches_patches_and_deletes(kubectl):
    manifest = yaml.safe_dump({'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'name': 'cm'},
                               'data': {'k': 'v1'}})
    assert 'configmap/cm created' in kubectl('apply', '--validate=false', '-f', '-', input=manifest).stdout
    assert json.loads(kubectl('get', 'configmap', 'cm', '-o', 'json').stdout)['data'] == {'k': 'v1'}
    assert kubectl('get', 'configmaps').stdout.split()[:3] == ['NAME', 'AGE', 'cm']

    command = ['kubectl', 'get', 'configmap', 'cm', '-w', '--request-timeout=20s',
               '-o', 'custom-columns=NAME:.metadata.name,K:.data.k', '--no-headers']
    with subprocess.Popen(command, env=kubectl.env, stdout=subprocess.PIPE, text=True) as watcher:
        try:
            read_until(watcher, 'v1')
            kubectl('patch', 'configmap', 'cm', '--type=merge', '-p', '{"data": {"k": "v2"}}')
            read_until(watcher, 'v2')
        finally:
            watcher.kill()

    replace = '[{"op": "replace", "path": "/data/k", "value": "v3"}]'
    kubectl('patch', 'configmap', 'cm', '--type=json', '-p', replace)
    assert kubectl('get', 'cm', 'cm', '-o', 'jsonpath={.data.k}').stdout == 'v3'
    assert 'deleted' in kubectl('delete', 'configmap', 'cm', '--timeout=10s').stdout
    assert 'NotFound' in kubectl('get', 'configmap', 'cm', check=False).stderr


@pytest.mark.timeout(60)
def test_watch_from_a_listed_resource_version_sees_later_events_only(emulator):
    core = client.CoreV1Api(api_client(emulator))
    core.create_namespaced_config_map('default', {'metadata': {'name': 'a'}})
    listed = core.list_namespaced_config_map('default').metadata.resource_version
    core.create_namespaced_config_map('default', {'metadata': {'name': 'b'}})
    core.patch_namespaced_config_map('a', 'default', {'data': {'x': '1'}})

    later = watch.Watch().stream(core.list_namespaced_config_map, 'default', resource_version=listed,
                                 timeout_seconds=1)
    assert [(e['type'], e['object'].metadata.name) for e in later] == [('ADDED', 'b'), ('MODIFIED', 'a')]
    fresh = watch.Watch().stream(core.list_namespaced_config_map, 'default', timeout_seconds=1)
    assert [(e['type'], e['object'].metadata.name) for e in fresh] == [('ADDED', 'a'), ('ADDED', 'b')]


@pytest.mark.timeout(60)
def test_watch_from_a_forgotten_resource_version_is_told_to_relist():
    with running_cluster(event_limit=4) as emulator:
        core = client.CoreV1Api(api_client(emulator))
        for index in range(6):
            core.create_namespaced_config_map('default', {'metadata': {'name': f'cm{index}'}})
        [event] = raw_lines(f'{emulator.url}/api/v1/namespaces/default/configmaps?watch=1&resourceVersion=1')
    assert (event['type'], event['object']['code'], event['object']['reason']) == ('ERROR', 410, 'Expired')


@pytest.mark.timeout(60)
def test_emulator_stops_at_once_with_watch_streams_open(kubectl, emulator):
    command = ['kubectl', 'get', 'namespaces', '-w', '--request-timeout=30s']
    with subprocess.Popen(command, env=kubectl.env, stdout=subprocess.PIPE, text=True) as watcher:
        try:
            read_until(watcher, 'kube-system')
            started = time.monotonic()
            emulator.stop()
            assert time.monotonic() - started < 2
        finally:
            watcher.kill()


@pytest.mark.timeout(60)
def test_kopf_operator_adds_a_finalizer_on_create_and_releases_it_on_delete(emulator, widgets):
    registry, handled = kopf.OperatorRegistry(), []

    @kopf.on.login(registry=registry)
    def login(**_):
        return kopf.ConnectionInfo(server=emulator.url, default_namespace='default')

    @kopf.on.create('test.moefleet.dev', 'widgets', registry=registry, id='create')
    def create(name, patch, **_):
        handled.append(('create', name))
        patch.status['phase'] = 'Ready'

    @kopf.on.delete('test.moefleet.dev', 'widgets', registry=registry, id='delete')
    def delete(name, **_):
        handled.append(('delete', name))

    with KopfRunner(['run', '--standalone', '-n', 'default'], registry=registry, timeout=30) as runner:
        widgets('apply', '--validate=false', '-f', '-', input=widget('w', replicas=1))
        widgets('wait', '--for=jsonpath={.status.phase}=Ready', 'widget/w', '--timeout=20s')
        finalizers = custom(emulator).get_namespaced_custom_object(*WIDGETS, 'w')['metadata']['finalizers']
        assert finalizers == ['kopf.zalando.org/KopfFinalizerMarker']
        widgets('delete', 'widget', 'w', '--timeout=20s')  # waits until kopf releases the finalizer
        assert 'NotFound' in widgets('get', 'widget', 'w', check=False).stderr
    assert runner.exit_code == 0, runner.output
    assert handled == [('create', 'w'), ('delete', 'w')]


@pytest.mark.timeout(60)
def test_invalid_widgets_are_rejected_by_kubectl_apply_naming_the_field(emulator, widgets):
    def apply(text: str) -> str:
        result = widgets('apply', '--validate=false', '-f', '-', input=text, check=False)
        assert result.returncode == 1
        return result.stderr

    assert ('spec.replicas: Invalid value: -1: spec.replicas in body should be greater than or equal to 0'
            in apply(widget('a', replicas=-1)))
    assert ('spec.mode: Unsupported value: "x": supported values: "fast", "slow"'
            in apply(widget('b', replicas=1, mode='x')))
    assert ('spec: Invalid value: "object": minReplicas must not exceed replicas'
            in apply(widget('c', replicas=1, minReplicas=2)))

    with pytest.raises(ApiException) as error:
        custom(emulator).create_namespaced_custom_object(*WIDGETS, {
            'apiVersion': 'test.moefleet.dev/v1', 'kind': 'Widget', 'metadata': {'name': 'd'}, 'spec': {}})
    status = json.loads(error.value.body)
    assert (status['kind'], status['code'], status['reason']) == ('Status', 422, 'Invalid')
    assert status['message'].startswith('Widget.test.moefleet.dev "d" is invalid: [spec.replicas: Required')
    assert status['details']['causes'][0] == {
        'reason': 'FieldValueRequired', 'field': 'spec.replicas', 'message': 'Required value'}
    assert 'No resources found' in widgets('get', 'widgets').stderr


@pytest.mark.timeout(60)
def test_widget_defaults_are_applied_and_unknown_fields_pruned(emulator, widgets):
    widgets('apply', '--validate=false', '-f', '-', input=widget('w', replicas=2, colour='red'))
    spec = custom(emulator).get_namespaced_custom_object(*WIDGETS, 'w')['spec']
    assert spec == {'replicas': 2, 'minReplicas': 0, 'mode': 'fast', 'limits': {'burst': 3}}


@pytest.mark.timeout(60)
def test_kubectl_scale_sets_spec_replicas_through_the_scale_subresource(emulator, widgets):
    api = custom(emulator)
    widgets('apply', '--validate=false', '-f', '-', input=widget('w', replicas=1))
    api.patch_namespaced_custom_object_status(*WIDGETS, 'w', {'status': {'replicas': 1, 'selector': 'app=w'}})
    assert 'widget.test.moefleet.dev/w scaled' in widgets('scale', 'widget', 'w', '--replicas=4').stdout
    obj = api.get_namespaced_custom_object(*WIDGETS, 'w')
    assert (obj['spec']['replicas'], obj['metadata']['generation']) == (4, 2)

    scale = json.loads(widgets('get', 'widget', 'w', '--subresource=scale', '-o', 'json').stdout)
    assert (scale['kind'], scale['spec']) == ('Scale', {'replicas': 4})
    assert scale['status'] == {'replicas': 1, 'selector': 'app=w'}
    too_many = widgets('scale', 'widget', 'w', '--replicas=11', check=False)
    assert 'spec.replicas in body should be less than or equal to 10' in too_many.stderr


@pytest.mark.timeout(60)
def test_kubectl_get_widgets_prints_the_printer_columns(widgets):
    widgets('apply', '--validate=false', '-f', '-', input=widget('w', replicas=2, mode='slow'))
    widgets('patch', 'widget', 'w', '--subresource=status', '--type=merge',
            '-p', '{"status": {"conditions": [{"type": "Ready", "status": "True"}]}}')
    header, row = widgets('get', 'widgets').stdout.splitlines()
    assert header.split() == ['NAME', 'REPLICAS', 'READY', 'MODE', 'AGE']
    assert row.split()[:4] == ['w', '2', 'True', 'slow']
    assert widgets('get', 'wd', '-A', '--no-headers').stdout.split()[:2] == ['default', 'w']


@pytest.mark.timeout(60)
def test_status_patches_and_main_patches_do_not_cross(emulator, widgets):
    api = custom(emulator)
    widgets('apply', '--validate=false', '-f', '-', input=widget('w', replicas=1))
    both = {'spec': {'replicas': 2}, 'status': {'phase': 'x'}}
    main = api.patch_namespaced_custom_object(*WIDGETS, 'w', both)
    assert (main['spec']['replicas'], main.get('status'), main['metadata']['generation']) == (2, None, 2)

    status = api.patch_namespaced_custom_object_status(*WIDGETS, 'w', {'spec': {'replicas': 9},
                                                                       'status': {'phase': 'y'}})
    assert (status['spec']['replicas'], status['status']) == (2, {'phase': 'y'})
    assert status['metadata']['generation'] == 2
    labelled = api.patch_namespaced_custom_object(*WIDGETS, 'w', {'metadata': {'labels': {'a': 'b'}}})
    assert labelled['metadata']['generation'] == 2


@pytest.mark.timeout(60)
def test_label_selectors_filter_lists_and_watches(emulator, widgets):
    for name, tier in (('w1', 'gold'), ('w2', 'silver'), ('w3', 'gold')):
        widgets('apply', '--validate=false', '-f', '-', input=widget(name, {'tier': tier}, replicas=1))
    assert widgets('get', 'widgets', '-l', 'tier=gold', '-o', 'name').stdout.split() == [
        'widget.test.moefleet.dev/w1', 'widget.test.moefleet.dev/w3']
    selector = 'tier notin (gold),!gone'
    listed = custom(emulator).list_namespaced_custom_object(*WIDGETS, label_selector=selector)
    assert [item['metadata']['name'] for item in listed['items']] == ['w2']

    widgets('label', 'widget', 'w1', 'tier=silver', '--overwrite')
    rv = listed['metadata']['resourceVersion']
    url = (f'{emulator.url}/apis/test.moefleet.dev/v1/namespaces/default/widgets?watch=true'
           f'&labelSelector=tier%3Dgold&resourceVersion={rv}&timeoutSeconds=1')
    assert [(e['type'], e['object']['metadata']['name']) for e in raw_lines(url)] == [('DELETED', 'w1')]


@pytest.mark.timeout(60)
def test_the_demo_entry_point_serves_until_sigterm(tmp_path):
    kubeconfig, env = tmp_path / 'kubeconfig', {**os.environ, 'PYTHONPATH': os.pathsep.join(sys.path)}
    command = [sys.executable, '-m', 'moe_operator.emulator', '--port', '0', '--kubeconfig', str(kubeconfig)]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as server:
        try:
            read_until(server, 'kubernetes emulator serving http://127.0.0.1:')
            server_url = yaml.safe_load(kubeconfig.read_text())['clusters'][0]['cluster']['server']
            [namespaces] = raw_lines(f'{server_url}/api/v1/namespaces')
            assert [item['metadata']['name'] for item in namespaces['items']] == ['default', 'kube-system']
            server.send_signal(signal.SIGTERM)
            assert server.wait(10) == 0
        finally:
            server.kill()
