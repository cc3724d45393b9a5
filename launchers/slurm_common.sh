# The slurm.conf lines that the one-node cluster (local_slurm.sh) and the two-node one in network
# namespaces (local_slurm_multi.sh) share; each script sources this file and writes its own
# hosts, paths and nodes around them.

slurm_conf_common() {
  cat <<'CONF'
# no cgroups in containers: track processes by ancestry, bind no tasks
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# no slurmdbd: sacct has nothing to show, squeue is the source of truth
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
SchedulerType=sched/backfill
# schedule every few seconds (defaults: 60 s main, 30 s backfill) so short test jobs start at once
SchedulerParameters=sched_interval=2,bf_interval=5
CONF
}
