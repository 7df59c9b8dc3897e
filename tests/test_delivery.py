"""The delivery contract over real brokers (Mosquitto and the embedded one), in one process:
a cloud worker's unacknowledged forward is delivered again after it dies, a cell cut off from
the broker answers every event late and once, an application that lost its session gets the
missed results replayed. tests/test_faults.py kills real processes."""
from __future__ import annotations

import math
import threading
import time

import pytest

from fogsplit.bench.proxy import TcpProxy
from fogsplit.cloud.worker import CloudWorker
from fogsplit.core.follow import ResultFollower
from fogsplit.core.manifest import load_bundle
from fogsplit.core.mqtt import MqttTransport, wait_until
from fogsplit.core.settings import DeviceSettings, GatewaySettings
from fogsplit.core.topics import Topics
from fogsplit.device.agent import DeviceAgent
from fogsplit.device.sources import ReplaySource
from fogsplit.gateway.gateway import Gateway

CELL = "cell0"


def fleet(name: str) -> Topics:
    return Topics(f"{name}{time.monotonic_ns() % 10**7}")


def test_a_forward_the_dying_worker_never_acked_is_delivered_again(mosquitto):
    """With a persistent session (configurable; workers start clean by default). Mosquitto only:
    rumqttd 0.20's router panics on a persistent shared-subscription member that dies holding an
    unacknowledged message (docs/broker.md), which is one more reason workers start clean."""
    broker = mosquitto
    topics = fleet("redeliver")
    got: list[bytes] = []
    first = threading.Event()
    with TcpProxy(broker) as proxy:
        worker = MqttTransport(proxy.url, f"{topics.fleet}-cloud0", session_expiry_s=60, manual_ack=True)
        worker.subscribe(topics.shared("cloud", topics.forward("+")), lambda msg: (got.append(msg.payload), first.set()))
        worker.connect()
        gateway = MqttTransport(broker, f"{topics.fleet}-gw").connect()
        gateway.publish(topics.forward(CELL), b"event 7", qos=1)
        assert first.wait(5)
        proxy.cut()                   # the worker dies before it acknowledged the forward
        worker._client.loop_stop()    # ... and never comes back on that connection
        again = MqttTransport(proxy.url, f"{topics.fleet}-cloud0", session_expiry_s=60, manual_ack=True)
        redelivered = threading.Event()
        again.subscribe(topics.shared("cloud", topics.forward("+")),
                        lambda msg: (msg.ack(), redelivered.set()) if msg.payload == b"event 7" else msg.ack())
        try:
            again.connect()
            assert redelivered.wait(10), "the broker did not deliver the unacknowledged forward again"
        finally:
            again.close()
            gateway.close()


@pytest.fixture
def cell(bundle_dir, trusted_keys, small_data, tmp_path):
    """A cloud worker, a gateway with a journal file and every device of the bundle, the devices
    behind one TCP proxy each; ``start(url)`` returns the pieces (the device agents last)."""
    started = []

    def start(url: str, *, events: int = 30, rate: float = 20.0):
        topics = fleet("cell")
        bundle = load_bundle(bundle_dir, trusted_keys=trusted_keys)
        test = small_data.test()
        services, proxies = [], []
        cloud = CloudWorker(MqttTransport(url, f"{topics.fleet}-cloud0", session_expiry_s=60, manual_ack=True),
                            topics, bundle)
        gateway = Gateway(MqttTransport(url, f"{topics.fleet}-gw0", session_expiry_s=60), topics, bundle, cell=CELL,
                          settings=GatewaySettings(journal=str(tmp_path / "journal.sqlite")))
        services += [cloud, gateway]
        start_slot = math.ceil((time.time() + 1.0) * rate)
        for sensor in bundle.manifest.sensor_names:
            proxy = TcpProxy(url)
            proxies.append(proxy)
            source = ReplaySource(test.sensors[sensor], rate=rate, start_slot=start_slot, count=events)
            services.append(DeviceAgent(MqttTransport(proxy.url, f"{topics.fleet}-{sensor}"), topics, bundle, cell=CELL,
                                        device=sensor, source=source,
                                        settings=DeviceSettings(rate=rate, reoffer_s=1.0,
                                                                spool=str(tmp_path / f"{sensor}.sqlite"))))
        results: dict[int, list] = {}
        app = ResultFollower(url, topics, CELL, lambda r: results.setdefault(r.event, []).append(r),
                             client_id=f"{topics.fleet}-app")
        app.connect()
        for service in services:
            service.transport.connect()
            service.start()
        started.append((services, proxies, app))
        devices = [s for s in services if isinstance(s, DeviceAgent)]
        return topics, gateway, proxies, app, results, set(range(start_slot, start_slot + events)), devices

    yield start
    for services, proxies, app in started:
        for service in services:
            service.stop()
            service.transport.close()
        for proxy in proxies:
            proxy.close()
        app.close()


def test_a_cell_cut_off_from_the_broker_answers_every_event_late_and_once(broker, cell):
    topics, gateway, proxies, app, results, events, _ = cell(broker, events=40, rate=20.0)
    assert wait_until(lambda: len(results) >= 5, timeout=15)
    for proxy in proxies:             # every device of the cell loses the broker for 2.5 s
        proxy.cut()
        proxy.refuse(2.5)
    assert wait_until(lambda: events <= set(results), timeout=40), f"unanswered: {sorted(events - set(results))}"
    time.sleep(1.5)                    # a second answer would come now
    assert app.duplicates == 0 and all(len(rs) == 1 for rs in results.values())
    late = [rs[0] for e, rs in results.items() if e in events and rs[0].late]
    assert late, "no event was answered late: the cut did not leave any event to the spools"
    assert all(r.late_s > 0 for r in late) and all(r.exit != "lost" for rs in results.values() for r in rs)
    assert gateway.snapshot().late == len(late)


def test_an_application_that_lost_its_session_gets_the_missed_results_replayed(broker, cell):
    topics, gateway, proxies, app, results, events, _ = cell(broker, events=40, rate=20.0)
    assert wait_until(lambda: len(results) >= 5, timeout=15)
    app.close()                         # the application is away while results are published ...
    time.sleep(1.0)
    missed = app.client_id
    back = ResultFollower(broker, topics, CELL, lambda r: results.setdefault(r.event, []).append(r),
                          client_id=f"{missed}-new", session_expiry_s=60)
    back._connected_once = True         # ... and comes back to a broker that lost its session:
    back._last_captured = max(r[0].captured for r in results.values())
    try:
        back.connect()                  # a new session: it asks the gateway for the results since
        assert wait_until(lambda: events <= set(results), timeout=30), \
            f"unanswered: {sorted(events - set(results))}"
        assert back.replays_asked == 1 and back.replayed > 0 and back.duplicates == 0
    finally:
        back.close()


def test_a_gateway_that_fell_behind_thins_the_devices_stream_and_answers_every_event_once(broker, cell):
    """The gateway's loop stalls for 2.5 s (a stand-in for more load than it can take): what
    piled up is shed, its acks ask the devices for 1 event in ``keep`` live, they hold the rest
    in their spools, and once it has caught up every event is answered, once."""
    topics, gateway, proxies, app, results, events, devices = cell(broker, events=80, rate=20.0)
    assert wait_until(lambda: len(results) >= 5, timeout=15)
    gateway.submit(time.sleep, 2.5)
    assert wait_until(lambda: events <= set(results), timeout=60), f"unanswered: {sorted(events - set(results))}"
    time.sleep(1.5)                    # a second answer would come now
    assert app.duplicates == 0 and all(len(rs) == 1 for rs in results.values())
    stats = gateway.snapshot()
    assert stats.shed > 0 and stats.admission["raises"] >= 1 and stats.admission["busy_s"] > 0
    assert sum(d.snapshot().held_back for d in devices) > 0, "no device held an event back"
    late = [rs[0] for e, rs in results.items() if e in events and rs[0].late]
    assert late and all(r.exit != "lost" for rs in results.values() for r in rs)
