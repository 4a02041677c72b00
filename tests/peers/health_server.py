"""A gRPC server on grpcio with its standard health service (grpcio-health-checking): service
"echo" is SERVING, service "other" NOT_SERVING. Prints one JSON readiness line."""
import json
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
servicer = health.HealthServicer()
servicer.set("", health_pb2.HealthCheckResponse.SERVING)
servicer.set("echo", health_pb2.HealthCheckResponse.SERVING)
servicer.set("other", health_pb2.HealthCheckResponse.NOT_SERVING)
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(json.dumps({"event": "ready", "addr": f"127.0.0.1:{port}"}), flush=True)
server.wait_for_termination()
