#!/usr/bin/env bash
# Two security groups for ray_cluster.yaml in which the workers' metrics export
# port (8080) is open to the head only, where Prometheus scrapes it.
#
# ray_cluster.yaml's default lets Ray create ONE group for every node (all
# traffic between members, SSH): 8080 is then reachable from every node of
# the cluster, never from outside. With these two groups a worker's 8080
# answers the head alone; everything else Ray, NCCL and gloo need between
# nodes stays open inside the cluster.
#
#   VPC_ID=vpc-... SSH_CIDR=203.0.113.0/24 AWS_REGION=us-west-2 bash deploy/aws/security_groups.sh
#
# It prints the two group ids: put them in ray_cluster.yaml's node_config
# lines marked "SecurityGroupIds" (head: the head group; gpu_1x and gpu_4x:
# the workers group). Not run here (no AWS access from these machines).
set -euo pipefail
: "${VPC_ID:?set VPC_ID to the VPC the cluster runs in}"
: "${SSH_CIDR:?set SSH_CIDR to the address range ray up connects from, e.g. 203.0.113.0/24}"
PREFIX="${PREFIX:-privimage-ray}"

create() {  # name description -> group id
  aws ec2 create-security-group --vpc-id "$VPC_ID" --group-name "$1" --description "$2" \
    --query GroupId --output text
}

HEAD=$(create "$PREFIX-head" "PrivImage Ray head: all from the cluster, SSH from SSH_CIDR")
WORKERS=$(create "$PREFIX-workers" "PrivImage Ray workers: metrics 8080 from the head only")

# Head: every port from the head and the workers (GCS 6379, dashboard/Jobs
# 8265, MLflow 5000, object manager, raylet, metrics), SSH from you.
aws ec2 authorize-security-group-ingress --group-id "$HEAD" --ip-permissions \
  "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$HEAD},{GroupId=$WORKERS}]" \
  "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=$SSH_CIDR}]"

# Workers: every port from the head (Prometheus scrapes 8080, the autoscaler
# connects over SSH); from other workers every port except 8080 (object
# transfers, raylet and worker ports, NCCL/gloo between DDP ranks).
aws ec2 authorize-security-group-ingress --group-id "$WORKERS" --ip-permissions \
  "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$HEAD}]" \
  "IpProtocol=tcp,FromPort=0,ToPort=8079,UserIdGroupPairs=[{GroupId=$WORKERS}]" \
  "IpProtocol=tcp,FromPort=8081,ToPort=65535,UserIdGroupPairs=[{GroupId=$WORKERS}]" \
  "IpProtocol=udp,FromPort=0,ToPort=65535,UserIdGroupPairs=[{GroupId=$WORKERS}]" \
  "IpProtocol=icmp,FromPort=-1,ToPort=-1,UserIdGroupPairs=[{GroupId=$WORKERS}]"

echo "head group:    $HEAD"
echo "workers group: $WORKERS"
