-- Run once on the coordinator by compose.citus.yaml's cluster service (run again, it changes nothing).
SELECT citus_set_coordinator_host('coordinator', 5432);
SELECT citus_add_node('worker1', 5432);
SELECT citus_add_node('worker2', 5432);
